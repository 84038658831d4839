"""Benchmark the Tensor Core weight GEMM against cuBLAS (torch fp16 matmul) on LLM layer shapes.

    python3 benchmarks/gemm_weight.py --kit .device-kit --out results/     (normally via kit/run.py)

For each layer [M, K] and token count N: the same random fp16 X [N, K] and W [M, K] go through
torch.matmul (cuBLAS) and through every candidate kernel of the kit (tile configs, split-K). Each
kernel's output is checked against an fp32 reference first; then both are timed (CUDA events, cold
L2, median). Reported per (layer, N, kernel): time, speedup over cuBLAS, achieved GB/s for the bytes a
GEMM must move (W + X + Y once), and that as a fraction of the measured copy bandwidth and of the
datasheet. The summary names the best kernel per (layer, N) and what the untuned choice reached.

FPx layers (format e3m2 / e2m2 / e2m1 = FP6 / FP5 / FP4, `benchmarks/kit/weights.py`): the kernels
take the packed planes + scales of W, cuBLAS takes decode(W) in fp16, the very same values. Bytes
moved count what each side reads (FPx: planes + scales), and the summary adds the ideal speedup
(cuBLAS's bytes / the FPx kernel's bytes: 2.65x for FP6 at N = 1) and the share of it reached.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Timer, environment, measure_copy_bandwidth, relative_error, write_results
from benchmarks.kit.kernels import KernelKit
from benchmarks.kit.weights import make_weight

TOLERANCE = 2e-3  # fp16 output, fp32 accumulation: ~1 ulp of the largest |Y|


def run_benchmark(
    kit: KernelKit, out_dir: Path, runs: int = 50, layers: list[str] | None = None, warmup: int = 10
) -> Path:
    import torch

    device = torch.device(kit.device_kind)
    torch.manual_seed(0)
    timer = Timer(device)
    env = environment(commit=kit.manifest.get("commit"), extra={"kit": kit.manifest.get("summary")})
    copy_bw = measure_copy_bandwidth(device)
    records, summary = [], []
    for layer, spec in kit.manifest["bench"].items():
        if layers and layer not in layers and spec.get("layer") not in layers:
            continue
        m, k = spec["m"], spec["k"]
        fmt = spec.get("format", "dense-fp16")
        weight = make_weight(fmt, m, k, device)
        wt = weight.dense.t()
        for n in spec["tokens"]:
            x = torch.randn(n, k, device=device).to(torch.float16)
            reference = x.float() @ weight.dense.float().t()
            y_base = torch.empty(n, m, dtype=torch.float16, device=device)
            torch.matmul(x, wt, out=y_base)
            base = timer.time(lambda: torch.matmul(x, wt, out=y_base), warmup, runs)  # noqa: B023
            base_err = relative_error(y_base, reference)
            activations = (n * k + n * m) * 2
            base_moved = m * k * 2 + activations
            moved = weight.stored_bytes + activations
            rows = []
            for name in spec["candidates"]:
                case = kit.case(name)
                y = torch.full((n, m), float("nan"), dtype=torch.float16, device=device)
                kernel = kit.function(case)
                ffi_args = [_ffi(kit).from_dlpack(t) for t in (x, *weight.stored, y)]
                kernel(*ffi_args)
                err = relative_error(y, reference)
                row = {"layer": layer, "format": fmt, "m": m, "k": k, "n": n, "kernel": name}
                row.update(config=case.config_dict, rel_error=err, correct=err < TOLERANCE)
                if err < TOLERANCE:
                    t = timer.time(lambda: kernel(*ffi_args), warmup, runs)  # noqa: B023
                    row.update(_rates(t.median_ms, moved, copy_bw, env.get("datasheet_bandwidth")))
                    row.update(time=t, speedup=base.median_ms / t.median_ms)
                rows.append(row)
            records.extend(rows)
            timed = [r for r in rows if "speedup" in r]
            best = max(timed, key=lambda r: r["speedup"], default=None)
            default = next((r for r in rows if r["kernel"] == spec["default"][str(n)]), None)
            summary.append(
                {
                    "layer": layer, "format": fmt, "m": m, "k": k, "n": n,
                    "stored_bytes": weight.stored_bytes, "ideal_speedup": base_moved / moved,
                    "cublas": {"time": base, "rel_error": base_err, **_rates(base.median_ms, base_moved, copy_bw,
                                                                             env.get("datasheet_bandwidth"))},
                    "best": _brief(best), "default": _brief(default),
                    "incorrect_kernels": [r["kernel"] for r in rows if not r["correct"]],
                }
            )  # fmt: skip
            if best is not None:
                summary[-1]["best"]["fraction_of_ideal_speedup"] = best["speedup"] / summary[-1]["ideal_speedup"]
            _print_line(summary[-1])
        del weight
    payload = {
        "benchmark": "gemm_weight",
        "what": "Y[N,M] = X[N,K] W[M,K]^T fp16, fp32 accumulate; tensorpress Tensor Core template (dense and FPx "
        "weights) vs cuBLAS fp16 on the same weight values",
        "environment": env,
        "copy_bandwidth": copy_bw,
        "runs_per_timing": runs,
        "tolerance": TOLERANCE,
        "summary": summary,
        "records": records,
    }
    return write_results(out_dir, "gemm_weight", payload)


def _ffi(kit: KernelKit):
    from benchmarks.kit.kernels import _runtime

    return _runtime(kit.device_kind)


def _rates(ms: float, moved: int, copy_bw: float | None, datasheet: float | None) -> dict:
    rate = moved / (ms * 1e-3)
    return {
        "bytes_moved": moved,
        "gb_per_s": rate / 1e9,
        "fraction_of_copy_bandwidth": rate / copy_bw if copy_bw else None,
        "fraction_of_datasheet_bandwidth": rate / datasheet if datasheet else None,
    }


def _brief(row: dict | None) -> dict | None:
    if row is None:
        return None
    keys = ("kernel", "speedup", "gb_per_s", "fraction_of_copy_bandwidth", "rel_error")
    return {key: row.get(key) for key in keys} | {"median_ms": row["time"].median_ms if "time" in row else None}


def _print_line(s: dict) -> None:
    best, default = s["best"] or {}, s["default"] or {}
    print(
        f"{s['layer']:<24} N={s['n']:<4} cuBLAS {s['cublas']['time'].median_ms * 1e3:8.1f} us | "
        f"best {best.get('speedup') or 0:5.2f}x of ideal {s['ideal_speedup']:4.2f}x "
        f"({(best.get('fraction_of_copy_bandwidth') or 0):4.0%} copy bw, {best.get('kernel', '-')}) | "
        f"default {default.get('speedup') or 0:5.2f}x | bad {len(s['incorrect_kernels'])}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", default=".device-kit", help="prepared kit folder")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per measurement")
    parser.add_argument("--layer", action="append", help="only these layers (repeatable)")
    args = parser.parse_args(argv)
    path = run_benchmark(KernelKit(args.kit), Path(args.out), runs=args.runs, layers=args.layer)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
