"""The CPU weight GEMM tuned (`tensorpress tune`'s template search) against its default config, side by side.

    .venv/bin/python benchmarks/tune_cpu_gemm.py
    .venv/bin/python benchmarks/tune_cpu_gemm.py --shapes 768x768 --formats fp6 --tokens 1 --trials 8

For each weight shape [M, K], format and token count N: the weight-GEMM PrimFunc (fp32 activations,
tensorpress.n_hint = N, as the compile pipeline makes it) is searched with `--trials` measured
candidates (`compiler/tuning/template_search.py`: default first, random start, XGBoost-ranked batches)
into a fresh log. Then the default config and the best one are rebuilt and timed again in alternating
rounds in this process (each a TVM time_evaluator median; a side's figure is its fastest round, the
machine being shared; the median round is kept beside it). Reported per kernel: both times, the
speedup, the search time until a trial reached 95 % of the best speed, the time to the first measured
candidate (cold start: build + time of the default), and the fraction of the copy bandwidth the tuned
kernel reaches (weight + X + Y bytes per second over numpy's copy of 256 MiB, read + write: DRAM;
above 1 where the weight stays in the caches between calls, as a few MB do here).
Writes JSON (benchmarks/results/tune_cpu_gemm.json) with the machine, load, versions and git commit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results" / "tune_cpu_gemm.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="768x768,3072x768", help="MxK weight shapes, comma-separated")
    parser.add_argument("--formats", default="dense-fp32-panel,fp6", help="weight formats, comma-separated")
    parser.add_argument("--tokens", default="1,16", help="token counts N, comma-separated")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7, help="alternating re-timing rounds of default and best")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def copy_bandwidth(nbytes: int = 256 << 20) -> float:
    """Bytes per second (read + write) of numpy copying `nbytes`, best of 5."""
    import numpy as np

    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def tune_one(fmt: str, m: int, k: int, n: int, trials: int, rounds: int, log_dir: Path) -> dict:
    """Search one kernel into `log_dir`, then re-time default and best side by side."""
    import numpy as np

    from tensorpress.compiler.formats import get_weight_format
    from tensorpress.compiler.targets import TargetSpec
    from tensorpress.compiler.tuning.measure import LocalMeasurer, TimingPlan
    from tensorpress.compiler.tuning.records import kernel_key
    from tensorpress.compiler.tuning.template_search import (
        TemplateKernel,
        build_candidate,
        cpu_weight_gemm_space,
        search_kernel,
    )
    from tensorpress.schedules.template_config import CPU_WEIGHT_GEMM, kernel_signature
    from tensorpress.schedules.weight_gemm import N_HINT_ATTR, make_weight_gemm

    target, space = TargetSpec("cpu"), cpu_weight_gemm_space()
    func = make_weight_gemm(get_weight_format(fmt).decode_stage(), m, k, "float32", "float32").with_attr(N_HINT_ATTR, n)
    kernel = TemplateKernel(
        f"{fmt} {m}x{k} N={n}", func, kernel_key(kernel_signature(func), CPU_WEIGHT_GEMM, target), n
    )
    start = time.perf_counter()
    result = search_kernel(kernel, space, target, log_dir, trials)
    search_s = time.perf_counter() - start
    default = space.configs(func, target.tvm_target())[0]
    measurer = LocalMeasurer(TimingPlan(repeat=5, min_repeat_ms=50))
    with tempfile.TemporaryDirectory() as tmp:
        built = [
            build_candidate(kernel, space, c, target, Path(tmp, f"{i}.so"))
            for i, c in enumerate([default, result.best_config])
        ]
        assert all(b is not None for b in built)
        times: list[list[float]] = [[], []]
        for _ in range(rounds):
            for side, candidate in enumerate(built):
                times[side].append(measurer.measure([candidate])[0])
    stored = sum(int(np.prod([int(d) for d in b.shape])) * np.dtype(b.dtype).itemsize for b in func.params[1:-1])
    moved = stored + 4 * n * (k + m)
    best_default, best_tuned = min(times[0]), min(times[1])
    return {
        "format": fmt,
        "m": m,
        "k": k,
        "tokens": n,
        "trials": result.trials,
        "space_size": result.space_size,
        "default_config": default,
        "tuned_config": result.best_config,
        "default_us": best_default * 1e6,
        "tuned_us": best_tuned * 1e6,
        "default_median_us": statistics.median(times[0]) * 1e6,
        "tuned_median_us": statistics.median(times[1]) * 1e6,
        "speedup": best_default / best_tuned,
        "search_seconds": search_s,
        "seconds_to_95pct_of_best": result.seconds_to_within(0.95),
        "seconds_to_first_candidate": result.history[0][0] if result.history else None,
        "bytes_moved": moved,
        "tuned_gb_per_s": moved / best_tuned / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from benchmarks.harness import environment, write_json

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    bandwidth = copy_bandwidth()
    load_before = os.getloadavg()
    records = []
    with tempfile.TemporaryDirectory() as log_dir:
        for fmt in args.formats.split(","):
            for m, k in shapes:
                for n in (int(t) for t in args.tokens.split(",")):
                    row = tune_one(fmt, m, k, n, args.trials, args.rounds, Path(log_dir))
                    row["fraction_of_copy_bandwidth"] = row["bytes_moved"] / (row["tuned_us"] * 1e-6) / bandwidth
                    records.append(row)
                    to95 = row["seconds_to_95pct_of_best"]
                    print(
                        f"{fmt:>18} {m}x{k} N={n:<3} default {row['default_us']:9.1f} us"
                        f"  tuned {row['tuned_us']:9.1f} us"
                        f"  {row['speedup']:.2f}x  95% of best after {to95:.0f} s of {row['search_seconds']:.0f} s"
                        f"  ({row['fraction_of_copy_bandwidth']:.0%} of copy bandwidth)",
                        flush=True,
                    )
    payload = {
        "benchmark": "tune_cpu_gemm",
        "environment": environment(
            extra={
                "cpu_count": os.cpu_count(),
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
                "copy_bandwidth_bytes_per_s": bandwidth,
            }
        ),
        "trials": args.trials,
        "records": records,
    }
    write_json(args.output, payload)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
