"""Run the kit on a GPU machine: the gpu tests, then the benchmarks; JSON and logs go to --out.

    python3 benchmarks/kit/run.py --out "$OUT"                  # on the GPU machine (Python 3.12 + torch)
    .venv/bin/python benchmarks/kit/run.py --out /tmp/kit-out   # here, after `prepare.py --dry`

Needs no TVM and no tensorpress install: it puts the kit's runtime (tvm_ffi, TVM's runtime libraries,
the runtime-only tensorpress) on the path. Writes to --out (at most 8 files, one folder level: what the
device tool brings back):
    gpu_tests_<device>_<time>.json   passed/failed/skipped per test, environment, the end of pytest's output
    gemm_weight_<device>_<time>.json the dense / FPx GEMM benchmark (see benchmarks/gemm_weight.py)
    sparse_gemm_gpu_<...>.json       the bitmap / tiled-csl sparse GEMM benchmark (benchmarks/sparse_gemm_gpu.py)
    kv_attention_gpu_<...>.json      the quantised-KV decode attention benchmark (benchmarks/kv_attention_gpu.py)
    tuning_<...>.json                the tuning part: candidate tile configs timed, rows = tuning records
                                     (benchmarks/kit/tuning_run.py; import: tensorpress tune --import-kit)
    run.log                          this script's own summary
    + the decoder part's three files (benchmarks/kit/decoder_run.py), where the kit has one
Parts can be left out (--skip-tests, --skip-bench, --skip-sparse, --skip-kv, --skip-decoders, --skip-tune) or
run alone (--only sparse,kv; a tuning kit from `tensorpress tune --target cuda`: --only tune): a short device
session runs what it needs.
Exit status: 0 when every gpu test passed and every kernel was correct, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GPU_TESTS = [
    "tests/schedules/tensorcore/test_template_gpu.py",
    "tests/schedules/tensorcore/test_fpx_gpu.py",
    "tests/schedules/tensorcore/test_bitmap_gpu.py",
]
LOG_TAIL_CHARS = 20000  # of pytest's output, kept in the gpu tests' JSON


PARTS = ("tests", "bench", "sparse", "kv", "decoders", "tune")


def kit_environment(kit: Path) -> dict[str, str]:
    """Environment variables that make the kit's runtime importable and findable."""
    python = kit / "runtime" / "python"
    return {
        "PYTHONPATH": os.pathsep.join([str(python), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "TENSORPRESS_TVM_LIB_DIR": str(kit / "runtime" / "tvm_libs"),
        "TENSORPRESS_GPU_KIT": str(kit),
        "TVM_FFI_DISABLE_TORCH_C_DLPACK": "1",  # no JIT-built torch extension on the device
        "PYTHONUNBUFFERED": "1",
    }


def run_gpu_tests(kit: Path, out: Path, dry: bool) -> dict:
    env = {**os.environ, **kit_environment(kit)}
    xml = out / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", *GPU_TESTS, "-p", "no:cacheprovider", "-q", "-rfE", f"--junitxml={xml}"]
    cmd += ["-m", "not slow"] if dry else ["-m", "gpu"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    results = _junit(xml)
    xml.unlink(missing_ok=True)
    output = (proc.stdout + proc.stderr)[-LOG_TAIL_CHARS:]  # in the JSON: the tool brings back 8 files at most
    return {"exit_status": proc.returncode, "seconds": time.perf_counter() - start, **results, "output_tail": output}


OTHER_SPARSE = ("tiled_csl", "sparse_fpx")  # the sparse benchmark's other formats, beside bitmap


def _has_incorrect_kernels(point: dict) -> bool:
    """Whether any format's kernel was wrong at this (layer, sparsity, N) point of the sparse benchmark."""
    return bool(point["incorrect_kernels"]) or any(point.get(key, {}).get("incorrect_kernels") for key in OTHER_SPARSE)


def _run_sparse(kit: Path, out: Path, runs: int, dry: bool, log: list[str]) -> bool:
    """The sparse GEMM benchmark (bitmap, tiled-csl, sparse x FP6); True when every kernel was correct."""
    from benchmarks.kit.kernels import KernelKit
    from benchmarks.sparse_gemm_gpu import run_benchmark

    start = time.perf_counter()
    workers = 2 if dry else min(16, os.cpu_count() or 1)  # the numpy packer, one band per process
    path = run_benchmark(KernelKit(kit), out, runs=min(runs, 3) if dry else runs, warmup=1 if dry else 10,
                         workers=workers)  # fmt: skip
    result = json.loads(path.read_text())
    bad = [s for s in result["summary"] if _has_incorrect_kernels(s)]
    lines = [f"sparse_gemm_gpu: {len(result['summary'])} (layer, sparsity, mask, N) points, {len(bad)} with incorrect "
             f"kernels, in {time.perf_counter() - start:.0f} s -> {path.name}"]  # fmt: skip
    for s in result["summary"]:
        if s["n"] in (1, 16) or "target_met" in s:
            best = s["best"] or {}
            met = "met" if s.get("target_met") else "MISSED"
            target = f" target {s['target_speedup']}x {met}" if "target_met" in s else ""
            speedup, share = best.get("speedup") or 0, best.get("fraction_of_copy_bandwidth") or 0
            where = f"{s['layer']:<20} {s['sparsity']:.0%} {s['mask']:<6} N={s['n']:<3}"
            lines.append(f"  {where} bitmap {speedup:5.2f}x cuBLAS "
                         f"(ideal {s['ideal_speedup']:.2f}x, {share:.0%} copy bw){target}")  # fmt: skip
            for other in (s[key] for key in OTHER_SPARSE if key in s):  # other formats of the same pruned W
                met = ""
                if "target_met" in other:
                    met = f" target {other['target_speedup']}x {'met' if other['target_met'] else 'MISSED'}"
                lines.append(f"  {'':<20} {other['format']} {(other['best'] or {}).get('speedup') or 0:5.2f}x "
                             f"cuBLAS (ideal {other['ideal_speedup']:.2f}x){met}")  # fmt: skip
    log.extend(lines)
    print("\n".join(lines), flush=True)
    return not bad


def _run_kv(kit: Path, out: Path, runs: int, dry: bool, log: list[str]) -> bool:
    """The quantised-KV decode attention benchmark; True when every kernel's output was correct."""
    from benchmarks.kv_attention_gpu import run_benchmark

    start = time.perf_counter()
    path = run_benchmark(kit, out, runs=min(runs, 3) if dry else runs, warmup=1 if dry else 10)
    result = json.loads(path.read_text())
    bad = [c for c in result["checks"] if not c["correct"]]
    lines = [f"kv_attention_gpu: {len(result['rows'])} timings, {len(bad)} of {len(result['checks'])} output checks "
             f"failed, in {time.perf_counter() - start:.0f} s -> {path.name}"]  # fmt: skip
    for row in result["rows"]:
        lines.append(f"  {row['format']:<5} G={row['group']} B={row['batch']:<2} T={row['context']:<6} "
                     f"{row['ours_ms'] * 1e3:8.1f} us, {row['speedup_over_sdpa']:5.2f}x SDPA fp16, "
                     f"{row['speedup_over_fp16_cache']:5.2f}x our fp16 cache, "
                     f"{row['fraction_of_copy_bandwidth'] or 0:.0%} copy bw")  # fmt: skip
    log.extend(lines)
    print("\n".join(lines), flush=True)
    return not bad


def _junit(path: Path) -> dict:
    if not path.exists():
        return {"passed": 0, "failed": 0, "skipped": 0, "tests": {}}
    tests = {}
    for case in ElementTree.parse(path).iter("testcase"):
        status = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            status = "failed"
        elif case.find("skipped") is not None:
            status = "skipped"
        tests[case.get("name")] = status
    count = lambda s: sum(v == s for v in tests.values())  # noqa: E731
    return {"passed": count("passed"), "failed": count("failed"), "skipped": count("skipped"), "tests": tests}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the GPU kit (see the module docstring).")
    parser.add_argument("--kit", default=str(ROOT / ".device-kit"))
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--runs", type=int, default=50, help="timed runs per benchmark measurement")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--layer", action="append", help="only these benchmark layers (repeatable)")
    parser.add_argument("--skip-decoders", action="store_true", help="skip the decoder part (decoder_run.py)")
    parser.add_argument("--skip-sparse", action="store_true", help="skip the sparse GEMM benchmark")
    parser.add_argument("--skip-kv", action="store_true", help="skip the KV attention benchmark")
    parser.add_argument("--skip-tune", action="store_true", help="skip the tuning part (tuning_run.py)")
    parser.add_argument("--only", help=f"comma-separated parts to run, of {','.join(PARTS)}")
    args = parser.parse_args(argv)
    if args.only:
        chosen = set(args.only.split(","))
        if chosen - set(PARTS):
            parser.error(f"--only takes parts of {', '.join(PARTS)}")
        for part in PARTS:
            if part not in chosen:
                setattr(args, f"skip_{part}", True)
    kit, out = Path(args.kit).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((kit / "manifest.json").read_text())
    os.environ.update(kit_environment(kit))
    sys.path[:0] = [str(kit / "runtime" / "python"), str(ROOT)]
    log = []
    ok = True

    import torch  # before tvm_ffi: tensors cross over by DLPack

    from benchmarks.harness import environment, write_results

    env = environment(commit=manifest["commit"]["sha"], extra={"kit": manifest["summary"]})
    if not manifest["dry"] and not torch.cuda.is_available():
        print("no CUDA device visible: run this on the GPU machine, or prepare a --dry kit", file=sys.stderr)
        return 1
    if not args.skip_tests:
        tests = run_gpu_tests(kit, out, manifest["dry"])
        path = write_results(out, "gpu_tests", {"environment": env, **tests})
        ok &= tests["exit_status"] == 0 and tests["failed"] == 0 and tests["passed"] > 0
        log.append(f"gpu tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped "
                   f"in {tests['seconds']:.0f} s -> {path.name}")  # fmt: skip
        print(log[-1], flush=True)
    if not args.skip_bench:
        from benchmarks.gemm_weight import run_benchmark
        from benchmarks.kit.kernels import KernelKit

        dry = manifest["dry"]  # CPU-built kernels: timings mean nothing, a few runs prove the plumbing
        runs, warmup = (min(args.runs, 3), 1) if dry else (args.runs, 10)
        path = run_benchmark(KernelKit(kit), out, runs=runs, layers=args.layer, warmup=warmup)
        result = json.loads(path.read_text())
        bad = [s for s in result["summary"] if s["incorrect_kernels"]]
        ok &= not bad
        log.append(f"gemm_weight: {len(result['summary'])} (layer, N) points, {len(bad)} with incorrect kernels "
                   f"-> {path.name}")  # fmt: skip
        for s in result["summary"]:
            best = s["best"] or {}
            share = best.get("fraction_of_copy_bandwidth") or 0
            speedup = best.get("speedup") or 0
            ideal = s.get("ideal_speedup") or 1.0
            log.append(f"  {s['layer']:<24} N={s['n']:<4} best {speedup:5.2f}x cuBLAS ({share:.0%} of copy bw; "
                       f"ideal {ideal:.2f}x)")  # fmt: skip
        print("\n".join(log[-len(result["summary"]) - 1 :]), flush=True)
    if manifest.get("sparse_bench") and not args.skip_sparse:
        ok &= _run_sparse(kit, out, args.runs, manifest["dry"], log)
    if manifest.get("kv_bench") and not args.skip_kv:
        ok &= _run_kv(kit, out, args.runs, manifest["dry"], log)
    if manifest.get("tuning") and not args.skip_tune:  # candidate tile configs -> records (tuning_run.py)
        from benchmarks.kit.tuning_run import run_tuning

        start = time.perf_counter()
        path = run_tuning(kit, out, manifest["dry"], log=lambda line: (log.append(line), print(line, flush=True)))
        failed = [p for p in json.loads(path.read_text())["points"] if p["best_seconds"] is None]
        ok &= not failed
        log.append(f"tuning: {len(failed)} points with no correct candidate, {time.perf_counter() - start:.0f} s "
                   f"-> {path.name}")  # fmt: skip
        print(log[-1], flush=True)
    if manifest.get("decoders") and not args.skip_decoders:  # decoders: benchmarks/kit/decoder_run.py
        from benchmarks.kit.decoder_run import run_decoders

        passed, lines = run_decoders(kit, out, {**os.environ, **kit_environment(kit)}, manifest["dry"])
        ok &= passed
        log += lines
        print("\n".join(lines), flush=True)
    (out / "run.log").write_text("\n".join(log) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
