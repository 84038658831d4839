"""Linears that read one input, as separate weight GEMMs vs one over their stacked weights (FuseParallelLinears).

    .venv/bin/python benchmarks/stacked_linears_cpu.py [--groups 384x384x3,384x1536x2] [--tokens 128,1024]

For each group MxKxG (G layers of [M, K], e.g. MiniLM's q/k/v: 384x384x3) and token count N: G calls of
the [M, K] dense weight GEMM (the CPU rule's kernel, `benchmarks/fpx_gemm_cpu.build_kernel`, the format
the CPU compile stores dense fp32 weights in) against one call of the [G*M, K] kernel on the same input,
bias-less. Rounds alternate the two sides, each after a 2 ms pause (a pass's other kernels run between
these; the pool's workers sleep at once, TVM_THREAD_POOL_SPIN_COUNT=0); the machine is shared, so a
side's figure is its fastest round, with its 10th percentile and median beside it. TVM's pool gets
every CPU this process may use. Writes JSON (benchmarks/results/stacked_linears_cpu.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results" / "stacked_linears_cpu.json"
FORMAT = "dense-fp32-panel"
PAUSE_S = 0.002


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="384x384x3", help="MxKxG list: G layers of [M, K] reading one input")
    parser.add_argument("--tokens", default="128,1024", help="N list")
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def measure(m: int, k: int, g: int, n: int, rounds: int) -> dict:
    """One record: `g` [m, k] weight GEMMs apart vs stacked, on the same [n, k] input (module docstring)."""
    import numpy as np
    import tvm

    from benchmarks.fpx_gemm_cpu import build_kernel
    from tensorpress.compiler.formats import get_weight_format

    dev, fmt = tvm.cpu(), get_weight_format(FORMAT)
    rng = np.random.default_rng(n)
    weights = [rng.standard_normal((m, k)).astype(np.float32) for _ in range(g)]
    apart, stacked = build_kernel(FORMAT, m, k, n), build_kernel(FORMAT, g * m, k, n)
    x = tvm.runtime.tensor(rng.standard_normal((n, k)).astype(np.float32), dev)
    w_apart = [tvm.runtime.tensor(fmt.pack(w).arrays["weight"], dev) for w in weights]
    w_stacked = tvm.runtime.tensor(fmt.pack(np.concatenate(weights)).arrays["weight"], dev)
    y_apart = [tvm.runtime.empty((n, m), "float32", dev) for _ in range(g)]
    y_stacked = tvm.runtime.empty((n, g * m), "float32", dev)
    calls = {
        "apart": lambda: [apart(x, w, y) for w, y in zip(w_apart, y_apart)],
        "stacked": lambda: stacked(x, w_stacked, y_stacked),
    }
    for call in calls.values():
        call()
    diff = float(np.abs(np.concatenate([y.numpy() for y in y_apart], axis=1) - y_stacked.numpy()).max())
    times: dict[str, list[float]] = {side: [] for side in calls}
    for _ in range(rounds):
        for side, call in calls.items():
            time.sleep(PAUSE_S)
            start = time.perf_counter()
            call()
            times[side].append((time.perf_counter() - start) * 1e3)
    row: dict = {"m": m, "k": k, "layers": g, "tokens": n, "max_abs_diff": diff}
    for side, samples in times.items():
        row[f"{side}_ms"] = min(samples)
        row[f"{side}_p10_ms"] = float(np.percentile(samples, 10))
        row[f"{side}_median_ms"] = statistics.median(samples)
    row["stacked_speedup"] = row["apart_ms"] / row["stacked_ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("TVM_NUM_THREADS", str(cores))
    from benchmarks.harness import environment, write_json

    load_before = os.getloadavg()
    rows = []
    for group in args.groups.split(","):
        m, k, g = (int(v) for v in group.split("x"))
        for n in (int(v) for v in args.tokens.split(",")):
            row = measure(m, k, g, n, args.rounds)
            rows.append(row)
            print(
                f"{g} x [{m}x{k}], N={n}: apart {row['apart_ms']:.3f} ms (p10 {row['apart_p10_ms']:.3f}), stacked "
                f"{row['stacked_ms']:.3f} ms (p10 {row['stacked_p10_ms']:.3f}): {row['stacked_speedup']:.2f}x"
            )
    payload = {
        "benchmark": "stacked_linears_cpu",
        "command": " ".join(["benchmarks/stacked_linears_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "format": FORMAT,
        "environment": environment(
            extra={
                "cpu_count": os.cpu_count(),
                "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
            }
        ),
        "records": rows,
    }
    write_json(args.output, payload)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
