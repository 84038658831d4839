"""What SparseGPT costs on one large linear layer on this CPU (issue 12): W [K, K] (default 4096 x 4096,
an LLM's attention projection) pruned to 50% from the Gram matrix of `--tokens` calibration tokens
(synthetic activations with outlier channels, as in tests/compiler/test_pruning.py), float64 numpy as
the compiler runs it (compiler/pruning.py):

  sweep    the OBS sweep alone (`--prune sparsegpt-sweep`, the paper's algorithm), timed whole;
  refit    one exact least-squares refit of every row on the sweep's mask (what `--prune sparsegpt`
           adds, once plus once per reselection round), by each solver of `least_squares_refit`:
           direct (LU per row) and cg (conjugate gradients to convergence, from the sweep's weights;
           the default at this size), timed on `--rows` rows and scaled to K rows (rows are solved
           independently; CG on few rows runs smaller, less efficient products: an upper bound);
  cg_step  one CG step over all K rows at once (an [K, K] x [K, K] product): timed whole; with the
           steps CG takes to match the direct solve to 1e-9 on the timed rows, the estimate of CG on
           the whole layer (refit_cg_estimate).

Wall-clock seconds, median of `--rounds` rounds, with the load average (the machine is shared). Writes
JSON (default benchmarks/results/sparsegpt_layer_cost_cpu.json).

    nice -n 19 .venv/bin/python benchmarks/sparsegpt_layer_cost_cpu.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import environment, write_json
from tensorpress.compiler import pruning
from tensorpress.compiler.pruning import SPARSEGPT_RESELECT_ROUNDS, dampened_hessian, least_squares_refit, sparsegpt

RESULTS = Path(__file__).resolve().parent / "results" / "sparsegpt_layer_cost_cpu.json"


def activations(tokens: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k))
    x[:, rng.choice(k, size=max(1, k // 64), replace=False)] *= 20.0
    return x


def cg_step(w: np.ndarray, keep: np.ndarray, h: np.ndarray) -> None:
    """The work of one step of the former refit: a masked [M, K] x [K, K] product and row reductions."""
    p = w * keep
    hp = p @ h * keep
    np.einsum("mk,mk->m", p, hp)


def cg_steps_to_match_direct(w, keep, h, start, limit: int = 300) -> int:
    """The fewest CG steps (in tens) whose result is the direct solve's to 1e-9 of its largest weight."""
    direct = least_squares_refit(w, keep, h, solver="direct")
    saved = pruning.REFIT_CG_STEPS
    try:
        for steps in range(10, limit + 1, 10):
            pruning.REFIT_CG_STEPS = steps
            cg = least_squares_refit(w, keep, h, start=start, solver="cg")
            if np.abs(cg - direct).max() <= 1e-9 * np.abs(direct).max():
                return steps
    finally:
        pruning.REFIT_CG_STEPS = saved
    return limit


def median_seconds(f, rounds: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times), [round(t, 2) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=4096, help="the layer is K x K")
    parser.add_argument("--tokens", type=int, default=512, help="calibration tokens behind the Gram matrix")
    parser.add_argument("--rows", type=int, default=64, help="rows the refit is timed on (then scaled to K)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    k = args.k
    x = activations(args.tokens, k)
    gram = x.T @ x
    w = np.random.default_rng(1).standard_normal((k, k)) / np.sqrt(k)
    h = dampened_hessian(gram)
    load_before = os.getloadavg()
    sweep, sweep_all = median_seconds(lambda: sparsegpt(w, 0.5, gram, refit=False), args.rounds)
    swept = sparsegpt(w, 0.5, gram, refit=False)
    keep = swept != 0
    rows = slice(0, args.rows)
    direct_rows, direct_all = median_seconds(
        lambda: least_squares_refit(w[rows], keep[rows], h, solver="direct"), args.rounds
    )
    cg_rows, cg_all = median_seconds(
        lambda: least_squares_refit(w[rows], keep[rows], h, start=swept[rows], solver="cg"), args.rounds
    )
    step, step_all = median_seconds(lambda: cg_step(w, keep, h), args.rounds)
    steps = cg_steps_to_match_direct(w[rows], keep[rows], h, swept[rows])
    direct, cg = direct_rows * k / args.rows, cg_rows * k / args.rows
    rounds_of_refit = 1 + SPARSEGPT_RESELECT_ROUNDS
    report = {
        "benchmark": "sparsegpt_layer_cost_cpu",
        "layer": [k, k],
        "sparsity": 0.5,
        "calibration_tokens": args.tokens,
        "seconds": {
            "sweep": round(sweep, 2),
            "refit_direct_scaled_from_rows": round(direct, 1),
            "refit_cg_scaled_from_rows": round(cg, 1),
            "refit_rows_timed": args.rows,
            "cg_step_all_rows": round(step, 2),
            "cg_steps_to_converge": steps,
            "refit_cg_estimate": round(steps * step, 1),
            "sparsegpt_total_cg_estimate": round(sweep + rounds_of_refit * steps * step, 1),
            "sparsegpt_sweep_total": round(sweep, 1),
            "sparsegpt_total_direct": round(sweep + rounds_of_refit * direct, 1),
            "sparsegpt_total_cg_bound": round(sweep + rounds_of_refit * cg, 1),
        },
        "rounds": {"sweep": sweep_all, "direct_rows": direct_all, "cg_rows": cg_all, "cg_step": step_all},
        "reselect_rounds": SPARSEGPT_RESELECT_ROUNDS,
        "command": " ".join([".venv/bin/python", "benchmarks/sparsegpt_layer_cost_cpu.py", *sys.argv[1:]]),
        "environment": environment(
            extra={"load_average_before": load_before, "load_average_after": os.getloadavg(), "cpus": os.cpu_count()}
        ),
    }
    env = report["environment"]
    print(json.dumps(report["seconds"], indent=1), "load", env["load_average_before"], env["load_average_after"])
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
