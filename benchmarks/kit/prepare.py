"""Prepare the folder a GPU session carries: kernels built here, the runtime, a manifest.

    .venv/bin/python benchmarks/kit/prepare.py                # sm_90a kernels for the H100/H200
    .venv/bin/python benchmarks/kit/prepare.py --dry          # CPU-built kernels: run.py works here

The tuning part (filling tuning_logs/sm_90a/), a kit of its own: dense fp16 and FP6 candidates on the
LLaMA-2-70B and OPT-66B layers at N = 1, 16, 64, 128 (cases.TUNING_*: 144 candidates, 15.5 MiB; 36 min
of nvcc here at load 8-10 on the 2 shared cores), then one device command (estimate printed: ~50 s
expected, <= 191 s), then the import here:

    .venv/bin/python benchmarks/kit/prepare.py --tuning --out .tuning-kit
    device tool: run(command='python3 benchmarks/kit/run.py --kit .tuning-kit --only tune --out "$OUT"',
                     carry=[".tuning-kit"], timeout_s=400)       # budget 90 s; bound printed by prepare
    .venv/bin/tensorpress tune --import-kit /work/.device/<files_at> --log tuning_logs/sm_90a

Layout (default .device-kit/, ignored by git; carry it with the device tool: carry=[".device-kit"]):

    .device-kit/
    ├── manifest.json            commit, versions, arch; every kernel (format, M, K, tile config, bias)
    │                            and its library; benchmark layers with candidates and the untuned
    │                            choice per N; the gpu tests' kernels and token counts
    ├── kernels/gemm_<M>x<K>.so  one library per LLM layer shape (all candidate configs)
    ├── kernels/fpx_<fmt>_<M>x<K>.so  FPx (FP6/FP5/FP4) candidates of the LLaMA-2-70B and OPT-66B layers
    ├── kernels/gpu_tests.so     the kernels of tests/schedules/tensorcore/test_template_gpu.py
    ├── kernels/fpx_gpu_tests.so the kernels of tests/schedules/tensorcore/test_fpx_gpu.py
    ├── kernels/bitmap_<M>x<K>.so  sparse candidates of the same layers (bitmap, tiled-csl; bitmap-e3m2 on
    │                            some), one kernel for every sparsity (benchmarks/sparse_gemm_gpu.py;
    │                            manifest "sparse_bench")
    ├── kernels/bitmap_gpu_tests.so  the kernels of tests/schedules/tensorcore/test_bitmap_gpu.py
    └── runtime/                 TVM's runtime without its compiler (tensorpress runtime bundle parts):
        ├── tvm_libs/            libtvm_runtime.so, libtvm_runtime_cuda.so, libcudart.so.13
        └── python/              tvm_ffi for the device's Python (3.12), runtime-only tensorpress, plus
                                 tensorpress.compiler.formats (numpy only) to pack FPx, bitmap
                                 and tiled-csl weights (and quantise KV pages) there
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.kit.cases import (  # noqa: E402
    BENCH_TOKENS,
    DRY_FPX_LAYERS,
    DRY_LAYERS,
    DRY_SPARSE_LAYERS,
    DRY_SPARSE_TOKENS,
    DRY_SPARSITIES,
    DRY_TEST_TOKENS,
    DRY_TOKENS,
    FPX_BENCH_FORMATS,
    FPX_BENCH_TOKENS,
    FPX_LAYERS,
    LLM_LAYERS,
    SPARSE_BENCH_TOKENS,
    SPARSE_FPX_FORMAT,
    SPARSE_FPX_LAYERS,
    SPARSE_FPX_SPARSITIES,
    SPARSE_LAYERS,
    SPARSITIES,
    TEST_TOKENS,
    TILED_CSL_FORMAT,
    TILED_CSL_SPARSITIES,
    WANDA_MASK_SPARSITIES,
    WANDA_MASK_TOKENS,
    KernelCase,
    bitmap_fpx_stream_capacity,
    bitmap_value_capacity,
    tiled_csl_word_capacity,
)

CARRY_LIMIT = 48 << 20  # the device tool carries 64 MiB with the working tree (~16 MiB today)


def prepare(
    out: Path, arch: str, dry: bool, python_version: str, layers: list[str] | None = None, decoders: bool = False
) -> dict:
    """Build the kit into `out` (replaced if it exists); returns the manifest. `decoders`: add the
    decoder part (benchmarks/kit/decoder_build.py)."""
    from benchmarks.kit.build import (
        bench_cases,
        bitmap_test_cases,
        build_library,
        fpx_bench_cases,
        fpx_test_cases,
        test_cases,
    )
    from tensorpress.compiler.tuning.tuning_kit import source_commit

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".kit.", dir=out.parent))
    try:
        (staging / "kernels").mkdir()
        build_arch = None if dry else arch
        choice_arch = "sm_90a" if dry else arch
        all_layers = DRY_LAYERS if dry else LLM_LAYERS
        chosen = {name: shape for name, shape in all_layers.items() if not layers or name in layers}
        tokens = DRY_TOKENS if dry else BENCH_TOKENS
        kernels: dict[str, KernelCase] = {}
        kernel_library: dict[str, str] = {}
        bench: dict[str, dict] = {}
        seconds: dict[str, float] = {}
        for layer, (m, k) in chosen.items():
            cases, defaults = bench_cases({layer: (m, k)}, tokens, choice_arch)
            library = f"kernels/gemm_{m}x{k}.so"
            if library not in seconds:  # layers of equal shape share a library
                print(f"building {library}: {len(cases)} kernels", flush=True)
                seconds[library] = build_library(cases, staging / library, build_arch)
            for c in cases:
                kernels[c.name], kernel_library[c.name] = c, library
            bench[layer] = {
                "m": m, "k": k, "tokens": list(tokens), "candidates": [c.name for c in cases],
                "default": {str(n): name for n, name in defaults[layer].items()},
            }  # fmt: skip
        fpx_all = DRY_FPX_LAYERS if dry else FPX_LAYERS
        fpx_layers = {name: shape for name, shape in fpx_all.items() if not layers or name in layers}
        fpx_tokens = DRY_TOKENS if dry else FPX_BENCH_TOKENS
        for display, fmt in FPX_BENCH_FORMATS.items():
            for layer, (m, k) in fpx_layers.items():
                cases, defaults = fpx_bench_cases(fmt, {layer: (m, k)}, fpx_tokens, choice_arch)
                library = f"kernels/fpx_{fmt}_{m}x{k}.so"
                if library not in seconds:
                    print(f"building {library}: {len(cases)} kernels", flush=True)
                    seconds[library] = build_library(cases, staging / library, build_arch)
                for c in cases:
                    kernels[c.name], kernel_library[c.name] = c, library
                bench[f"{display} {layer}"] = {
                    "layer": layer, "format": fmt, "m": m, "k": k, "tokens": list(fpx_tokens),
                    "candidates": [c.name for c in cases],
                    "default": {str(n): name for n, name in defaults[layer].items()},
                }  # fmt: skip
        sparse_bench = _build_sparse(staging, dry, layers, choice_arch, build_arch, kernels, kernel_library, seconds)
        tests, fpx_tests, bitmap_tests = test_cases(dry), fpx_test_cases(dry), bitmap_test_cases(dry)
        for library, cases in [
            ("kernels/gpu_tests.so", tests),
            ("kernels/fpx_gpu_tests.so", fpx_tests),
            ("kernels/bitmap_gpu_tests.so", bitmap_tests),
        ]:
            print(f"building {library}: {len(cases)} kernels", flush=True)
            seconds[library] = build_library(cases, staging / library, build_arch)
            for c in cases:
                kernels[c.name], kernel_library[c.name] = c, library
        test_tokens = list(DRY_TEST_TOKENS if dry else TEST_TOKENS)
        from benchmarks.kit.kv_build import build_kv_part

        print("building the KV part (decode attention per cache format)", flush=True)
        kv_bench = build_kv_part(staging, build_arch, dry)
        if decoders:
            from benchmarks.kit.decoder_build import prepare_decoders

            print("building the decoder part", flush=True)
            decoder_section = prepare_decoders(staging / "decoders", build_arch, dry)
        _copy_runtime(staging / "runtime", cuda=not dry, python_version=python_version)
        _copy_weight_formats(staging / "runtime" / "python" / "tensorpress")
        manifest = {
            "dry": dry,
            "arch": None if dry else arch,
            "python": python_version,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": source_commit(),
            "versions": _versions(),
            "kernels": {name: c.to_json() for name, c in kernels.items()},
            "kernel_library": kernel_library,
            "bench": bench,
            "tests": {"cases": [c.name for c in tests], "tokens": test_tokens},
            "fpx_tests": {"cases": [c.name for c in fpx_tests], "tokens": test_tokens},
            "bitmap_tests": {"cases": [c.name for c in bitmap_tests], "tokens": test_tokens},
            "sparse_bench": sparse_bench,
            "kv_bench": kv_bench,
            "build_seconds": seconds,
        }
        if decoders:
            manifest["decoders"] = decoder_section
        from benchmarks.kit.budget import gemm_estimate, kv_estimate, sparse_estimate

        manifest["device_estimate"] = {
            "gemm": gemm_estimate(bench),
            "sparse": sparse_estimate(sparse_bench),
            "kv": kv_estimate(kv_bench),
        }
        size = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
        manifest["summary"] = {"kernels": len(kernels), "bytes": size, "arch": manifest["arch"], "dry": dry}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if size > CARRY_LIMIT:
            raise SystemExit(f"the kit is {size / 2**20:.1f} MiB, over the {CARRY_LIMIT >> 20} MiB it may take")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest


def prepare_tuning(out: Path, arch: str, dry: bool, python_version: str) -> dict:
    """The tuning part alone (a kit of its own, so it fits a device session beside nothing else): the
    candidates of cases.TUNING_FORMATS on cases.TUNING_LAYERS at TUNING_TOKENS, built for `arch` (dry:
    for the CPU), keyed as a compile for `arch` keys them (compiler/tuning/tuning_kit.py). Returns the
    manifest, with its device estimate (budget.py)."""
    from benchmarks.kit.budget import tuning_estimate
    from benchmarks.kit.cases import (
        DRY_TUNING_CANDIDATES,
        DRY_TUNING_LAYERS,
        DRY_TUNING_TOKENS,
        TUNING_BUDGET_S,
        TUNING_CANDIDATES,
        TUNING_FORMATS,
        TUNING_LAYERS,
        TUNING_TOKENS,
    )
    from tensorpress.compiler.targets import TargetSpec
    from tensorpress.compiler.tuning.tuning_kit import point_kernels, write_tuning_kit

    layers = DRY_TUNING_LAYERS if dry else TUNING_LAYERS
    shapes = sorted({(fmt, m, k) for fmt in TUNING_FORMATS for m, k in layers.values()})
    kernels = point_kernels(shapes, DRY_TUNING_TOKENS if dry else TUNING_TOKENS, arch)
    count = DRY_TUNING_CANDIDATES if dry else TUNING_CANDIDATES
    manifest = write_tuning_kit(out, kernels, TargetSpec("cuda", arch), count, TUNING_BUDGET_S, dry=dry,
                                python_version=python_version)  # fmt: skip
    from benchmarks.harness import write_json

    manifest["device_estimate"] = {"tuning": tuning_estimate(manifest["tuning"])}
    write_json(out / "manifest.json", manifest)  # write-then-rename: the kit's manifest is whole or the old one
    return manifest


def _build_sparse(
    staging: Path, dry: bool, layers, choice_arch: str, build_arch, kernels: dict, kernel_library: dict, seconds: dict
) -> dict:
    """The bitmap, bitmap-e3m2 and tiled-csl kernels of the sparse benchmark (benchmarks/sparse_gemm_gpu.py),
    one library per layer; returns the manifest's "sparse_bench" section."""
    from benchmarks.kit.build import bitmap_bench_cases, bitmap_fpx_bench_cases, build_library, tiled_csl_bench_cases

    all_layers = DRY_SPARSE_LAYERS if dry else SPARSE_LAYERS
    sparsities = DRY_SPARSITIES if dry else SPARSITIES
    tokens = DRY_SPARSE_TOKENS if dry else SPARSE_BENCH_TOKENS
    section = {}
    for layer, (m, k) in all_layers.items():
        if layers and layer not in layers:
            continue
        cases, defaults = bitmap_bench_cases({layer: (m, k)}, tokens, choice_arch)
        fpx_layers = {layer: (m, k)} if layer in SPARSE_FPX_LAYERS else {}
        fpx_cases, fpx_defaults = bitmap_fpx_bench_cases(fpx_layers, tokens, choice_arch)
        csl_cases, csl_defaults = tiled_csl_bench_cases({layer: (m, k)}, tokens, choice_arch)
        library = f"kernels/bitmap_{m}x{k}.so"
        built = cases + fpx_cases + csl_cases
        print(f"building {library}: {len(built)} kernels", flush=True)
        seconds[library] = build_library(built, staging / library, build_arch)
        for c in built:
            kernels[c.name], kernel_library[c.name] = c, library
        section[layer] = {
            "m": m, "k": k, "sparsities": list(sparsities), "tokens": list(tokens),
            "capacity": bitmap_value_capacity(m, k, sparsities), "candidates": [c.name for c in cases],
            "default": {str(n): name for n, name in defaults[layer].items()},
        }  # fmt: skip
        # Wanda masks: the same bitmap kernels on uneven tiles (cases.WANDA_MASK_*)
        section[layer]["wanda"] = {"sparsities": list(WANDA_MASK_SPARSITIES), "tokens": list(WANDA_MASK_TOKENS)}
        if fpx_layers:  # sparse x FPx: the same masks at these sparsities, the kept values in FP6
            section[layer]["fpx"] = {
                "format": SPARSE_FPX_FORMAT, "sparsities": list(SPARSE_FPX_SPARSITIES),
                "capacity": bitmap_fpx_stream_capacity(m, k), "candidates": [c.name for c in fpx_cases],
                "default": {str(n): name for n, name in fpx_defaults[layer].items()},
            }  # fmt: skip
        section[layer]["tiled_csl"] = {  # tiled-csl (Flash-LLM's format): the same masks at these sparsities
            "format": TILED_CSL_FORMAT, "sparsities": list(TILED_CSL_SPARSITIES),
            "capacity": tiled_csl_word_capacity(m, k), "candidates": [c.name for c in csl_cases],
            "default": {str(n): name for n, name in csl_defaults[layer].items()},
        }  # fmt: skip
    return section


def _copy_runtime(dest: Path, cuda: bool, python_version: str) -> None:
    """TVM's runtime libraries, tvm_ffi for the target Python and the runtime-only tensorpress, with the
    same helpers as `tensorpress package` (compiler/runtime_bundle.py)."""
    from tensorpress.compiler.runtime_bundle import write_runtime_files

    write_runtime_files(dest, cuda, python_version)


def _copy_weight_formats(package: Path) -> None:
    """tensorpress.compiler.formats into the kit's runtime-only tensorpress (`write_weight_formats`): the
    FPx benchmark and gpu tests pack weights on the device with the very code the compiler packs with."""
    from tensorpress.compiler.runtime_bundle import write_weight_formats

    write_weight_formats(package)


def _versions() -> dict:
    """The compiler's versions (what tuning records and artifacts are keyed by) and nvcc's."""
    from tensorpress.compiler.build import compiler_versions

    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return {**compiler_versions(), "nvcc": nvcc[-1] if nvcc else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the GPU run kit (see the module docstring).")
    parser.add_argument("--out", default=str(ROOT / ".device-kit"), help="kit folder (replaced)")
    parser.add_argument("--arch", default="sm_90a", help="CUDA architecture of the kernels")
    parser.add_argument("--dry", action="store_true", help="CPU-built kernels to prove the plumbing here")
    parser.add_argument("--python", default=None, help="the device's Python (default 3.12; dry: this one)")
    parser.add_argument("--layer", action="append", help="only these benchmark layers (repeatable)")
    parser.add_argument("--no-decoders", action="store_true", help="leave out the decoder part (decoder_build.py)")
    parser.add_argument("--tuning", action="store_true", help="build the tuning part alone (see the docstring)")
    args = parser.parse_args(argv)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    python_version = args.python or (here if args.dry else "3.12")
    start = time.perf_counter()
    if args.tuning:
        manifest = prepare_tuning(Path(args.out), args.arch, args.dry, python_version)
    else:
        manifest = prepare(Path(args.out), args.arch, args.dry, python_version, args.layer, not args.no_decoders)
    summary = manifest["summary"]
    print(
        f"kit ready: {args.out} ({summary['bytes'] / 2**20:.1f} MiB, {summary['kernels']} kernels, "
        f"{'dry (CPU)' if args.dry else args.arch}, Python {python_version}) in {time.perf_counter() - start:.0f} s"
    )
    for part, estimate in manifest["device_estimate"].items():
        bound = f", <= {estimate['bound_s']} s if every timing uses its whole budget" if estimate["bound_s"] else ""
        print(f"device estimate, {part} part: {estimate['timings']} timings, ~{estimate['expected_s']} s expected"
              f"{bound} (benchmarks/kit/budget.py; the decoder part is not estimated)")  # fmt: skip
    if args.tuning:
        print(f'on the GPU: python3 benchmarks/kit/run.py --kit {args.out} --only tune --out "$OUT"; back here: '
              "tensorpress tune --import-kit RESULTS_FOLDER --log tuning_logs/" + args.arch)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
