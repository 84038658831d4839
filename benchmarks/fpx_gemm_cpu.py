"""Weight-format GEMV/GEMM (FPx, int8, any registered format) compiled for the CPU against torch fp32
`linear`: same process, same weights.

    .venv/bin/python benchmarks/fpx_gemm_cpu.py
    .venv/bin/python benchmarks/fpx_gemm_cpu.py --shapes 4096x4096 --tokens 1,4 --formats fp6 --rounds 10

For each weight shape [M, K], format and token count N: the weight GEMM PrimFunc of the format
(`schedules/weight_gemm.py` + the format's decode stage, fp32 activations, tensorpress.n_hint as
--n-hint: 16 is what the compile pipeline sets for decode steps) is scheduled by the CPU rule
(`schedules/cpu/weight_gemm.py`, the one `tensorpress compile --target cpu` uses: few tokens take
`decode_along_k`) and built for the artifact CPU target (x86-64-v3); torch runs
`torch.nn.functional.linear(x, W)` with W = decode(encode(W)) in fp32, the very values the kernel
decodes. The outputs are compared first.

Timing: rounds alternate the two sides, each call after a short pause (idle thread pools fall
asleep); a side's figure is its fastest round (this machine is shared; the minimum is the least
disturbed run), the median is kept beside it. Ratio = ours / torch (< 1: faster than torch). Weight
GB/s = the bytes each side's weight occupies (FPx: planes + scales; torch: 4 bytes a weight) over
its time; the fraction of the bandwidth limit is all bytes a call must move (weight, X, Y) per second
over this machine's measured copy bandwidth (torch's copy of 512 MiB, read + write). Writes JSON
(benchmarks/results/fpx_gemm_cpu.json) with machine, versions and git commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results" / "fpx_gemm_cpu.json"
PAUSE_S = 0.02


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,11008x4096", help="MxK weight shapes, comma-separated")
    parser.add_argument("--tokens", default="1,4,16", help="token counts N, comma-separated")
    parser.add_argument("--formats", default="fp6,fp5,fp4", help="weight formats, comma-separated")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--n-hint", type=int, default=16, help="tensorpress.n_hint of the kernels (tokens expected)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def build_kernel(fmt: str, m: int, k: int, n_hint: int):
    """The format's weight GEMM for [m, k], fp32 activations, scheduled by the CPU rule and built."""
    import tvm

    from tensorpress.compiler.formats import get_weight_format
    from tensorpress.compiler.targets import parse_target
    from tensorpress.schedules.cpu.weight_gemm import WeightGemm
    from tensorpress.schedules.weight_gemm import N_HINT_ATTR, make_weight_gemm

    stage = get_weight_format(fmt).decode_stage()
    func = make_weight_gemm(stage, m, k, act_dtype="float32").with_attr(N_HINT_ATTR, n_hint)
    target = parse_target("cpu").tvm_target()
    sch = WeightGemm().apply(func, target, False)
    if sch is None:
        raise RuntimeError(f"the CPU weight-GEMM rule declined {fmt} {m}x{k}")
    return tvm.compile(sch.mod, target=target)["main"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("TVM_NUM_THREADS", str(cores))

    import numpy as np
    import torch
    import tvm

    from benchmarks.harness import measure_copy_bandwidth
    from tensorpress.compiler.formats import get_weight_format

    copy_bw = measure_copy_bandwidth(torch.device("cpu"))
    print(f"copy bandwidth (read + write): {copy_bw / 1e9:.1f} GB/s")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    tokens = [int(v) for v in args.tokens.split(",")]
    formats = args.formats.split(",")
    print(f"threads: TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, torch {torch.get_num_threads()}")
    print(f"{'format':>6} {'M x K':>11} {'N':>3} {'ours ms':>8} {'torch ms':>8} {'ratio':>6} "
          f"{'ours w GB/s':>11} {'torch w GB/s':>12} {'ours bw%':>8} {'torch bw%':>9} {'rel err':>8}")  # fmt: skip
    rows = []
    dev = tvm.cpu()
    for m, k in shapes:
        w = (np.random.default_rng(m + k).standard_normal((m, k)) / k**0.5).astype(np.float32)
        for fmt in formats:
            spec = get_weight_format(fmt)
            packed = spec.pack(w)
            w_hat = torch.from_numpy(spec.unpack(packed))
            weight_bytes = packed.nbytes
            start = time.perf_counter()
            kernel = build_kernel(fmt, m, k, args.n_hint)
            build_s = time.perf_counter() - start
            stored = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in packed.arrays.values()]
            for n in tokens:
                x = np.random.default_rng(n).standard_normal((n, k)).astype(np.float32)
                x_t, x_tvm = torch.from_numpy(x), tvm.runtime.tensor(x, dev)
                y_tvm = tvm.runtime.empty((n, m), "float32", dev)
                ours, theirs = [], []
                with torch.no_grad():
                    kernel(x_tvm, *stored, y_tvm)
                    expected = torch.nn.functional.linear(x_t, w_hat)
                    err = float((torch.from_numpy(y_tvm.numpy()) - expected).abs().max() / expected.abs().max())
                    for _ in range(args.rounds):
                        time.sleep(PAUSE_S)
                        t0 = time.perf_counter()
                        kernel(x_tvm, *stored, y_tvm)
                        t1 = time.perf_counter()
                        time.sleep(PAUSE_S)
                        t2 = time.perf_counter()
                        torch.nn.functional.linear(x_t, w_hat)
                        t3 = time.perf_counter()
                        ours.append(t1 - t0)
                        theirs.append(t3 - t2)
                row = {
                    "format": fmt, "m": m, "k": k, "n": n,
                    "ours_ms": min(ours) * 1e3, "torch_ms": min(theirs) * 1e3,
                    "ratio": min(ours) / min(theirs),
                    "ours_median_ms": statistics.median(ours) * 1e3, "torch_median_ms": statistics.median(theirs) * 1e3,
                    "ours_weight_gb_per_s": weight_bytes / min(ours) / 1e9,
                    "torch_weight_gb_per_s": m * k * 4 / min(theirs) / 1e9,
                    "ours_fraction_of_copy_bandwidth": (weight_bytes + 4 * n * (k + m)) / min(ours) / copy_bw,
                    "torch_fraction_of_copy_bandwidth": 4 * (m * k + n * (k + m)) / min(theirs) / copy_bw,
                    "weight_bytes": weight_bytes, "rel_error": err, "build_seconds": build_s,
                }  # fmt: skip
                rows.append(row)
                print(
                    f"{fmt:>6} {f'{m}x{k}':>11} {n:3d} {row['ours_ms']:8.2f} {row['torch_ms']:8.2f} "
                    f"{row['ratio']:6.2f} {row['ours_weight_gb_per_s']:11.2f} {row['torch_weight_gb_per_s']:12.2f} "
                    f"{100 * row['ours_fraction_of_copy_bandwidth']:7.1f}% "
                    f"{100 * row['torch_fraction_of_copy_bandwidth']:8.1f}% {err:8.1e}",
                    flush=True,
                )
    result = {
        "benchmark": "fpx_gemm_cpu",
        "what": "weight-format GEMM (tensorpress CPU schedule, llvm x86-64-v3) vs torch.nn.functional.linear fp32",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores},
        "versions": {"torch": torch.__version__, "tvm": tvm.__version__, "numpy": np.__version__},
        "commit": _git_commit(),
        "timing": f"fastest of {args.rounds} alternating rounds",
        "n_hint": args.n_hint,
        "copy_bandwidth_bytes_per_s": copy_bw,
        "load_average_after": os.getloadavg(),
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"results: {args.output}")
    return 0


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    except OSError:
        return None
    return out.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
