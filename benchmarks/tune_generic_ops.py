"""Generic ops of MiniLM (all-MiniLM-L6-v2 shapes: 12 heads of 32, hidden 384, one sequence of 128 tokens)
tuned by meta_schedule against the schedule our rules give them, side by side on this CPU.

    .venv/bin/python benchmarks/tune_generic_ops.py                       # attention scores + layer norm
    .venv/bin/python benchmarks/tune_generic_ops.py --ops scores --trials 32

Each op is a one-op Relax graph lowered as the compile lowers it (the same TIR function MiniLM's build
gets at that shape): `scores` = q @ k^T, the attention's batched matmul [12,128,32] x [12,32,128];
`layer_norm` over [128, 384]. `tune_generic_ops` searches it (XGBoost cost model, LocalRunner) into a
fresh log. Then the op's kernel as our rules schedule it (what a build without the log gives it) and as
the best record schedules it are built alike, checked against numpy, and timed in this process on the
same inputs, alternately, by TVM's time_evaluator. Last, `build_library` is given the log: it applies
the record only where meta_schedule's runner found it faster than the rules (`applied`).

Reported per op: default and tuned ms (and both as meta_schedule's runner measured them), speedup,
trials measured, the trial (and seconds since the tune started, from meta_schedule's task log) at which
the best-so-far came within 95% of the best, and the seconds to the first measured trial (cold start:
builder workers never import the tensor intrinsics).
Writes benchmarks/results/tune_generic_ops_<device>_<time>.json with the load average.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import environment, write_results  # noqa: E402

from tensorpress.compiler.build import build_library  # noqa: E402
from tensorpress.compiler.targets import TargetSpec  # noqa: E402
from tensorpress.compiler.tuning.generic_ops import SearchBudget, tune_generic_ops  # noqa: E402
from tensorpress.compiler.tuning.generic_records import RECORDS, database_folder  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, HEAD_DIM, TOKENS, HIDDEN = 12, 32, 128, 384
TRIAL_LINE = re.compile(r"^(\S+ \S+) \[INFO\].*Trial #(\d+): GFLOPs: \S+ Time: ([\d.]+) us")


def op_graph(name: str):
    """(Relax module of the one op, its input arrays, numpy reference of its output)."""
    from tvm import relax

    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    if name == "scores":
        shapes = [(HEADS, TOKENS, HEAD_DIM), (HEADS, HEAD_DIM, TOKENS)]
        inputs = [rng.standard_normal(s).astype("float32") for s in shapes]
        params = [relax.Var(v, relax.TensorType(s, "float32")) for v, s in zip(("q", "kt"), shapes, strict=True)]
        with bb.function("main", params):
            with bb.dataflow():
                out = bb.emit_output(bb.emit(relax.op.matmul(*params)))
            bb.emit_func_output(out)
        return bb.get(), inputs, inputs[0] @ inputs[1]
    shapes = [(TOKENS, HIDDEN), (HIDDEN,), (HIDDEN,)]
    inputs = [rng.standard_normal(s).astype("float32") for s in shapes]
    params = [relax.Var(v, relax.TensorType(s, "float32")) for v, s in zip(("x", "gamma", "beta"), shapes, strict=True)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.layer_norm(*params, axes=[-1], epsilon=1e-12)))
        bb.emit_func_output(out)
    x, gamma, beta = inputs
    reference = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-12) * gamma + beta
    return bb.get(), inputs, reference


def kernels_side_by_side(mod, log_dir: Path, inputs, reference, rounds: int = 5) -> dict[str, float]:
    """The op's kernel as our rules schedule it and as the best record schedules it, built alike
    (tvm.tirx.build), checked against numpy, then timed alternately: best-of-rounds median ms."""
    import tvm
    from tvm.s_tir import dlight as dl
    from tvm.s_tir import meta_schedule as ms

    from tensorpress.compiler.tuning.generic_ops import find_generic_ops, lower_to_kernels
    from tensorpress.compiler.tuning.generic_records import WORKLOADS, normalized
    from tensorpress.schedules.rules import rules_for

    cpu = TargetSpec("cpu")
    target = cpu.tvm_target()
    (op,) = find_generic_ops(lower_to_kernels(mod, cpu))
    workload = tvm.IRModule({"main": normalized(op.func)})
    with target:
        default = dl.ApplyDefaultSchedule(*rules_for(target))(workload.clone())
    folder = database_folder(log_dir)
    database = ms.database.JSONDatabase(path_workload=str(folder / WORKLOADS), path_tuning_record=str(folder / RECORDS))
    tuned = database.query_schedule(workload, target, "main").mod
    dev = tvm.cpu()
    libs = {name: tvm.tirx.build(m, target=target) for name, m in (("default", default), ("tuned", tuned))}
    best = {name: float("inf") for name in libs}
    for lib in libs.values():
        args = [tvm.runtime.tensor(a, dev) for a in inputs] + [tvm.runtime.empty(reference.shape, "float32", dev)]
        lib["main"](*args)
        np.testing.assert_allclose(args[-1].numpy(), reference, rtol=1e-4, atol=1e-4)
    for _ in range(rounds):
        for name, lib in libs.items():
            args = [tvm.runtime.tensor(a, dev) for a in inputs] + [tvm.runtime.empty(reference.shape, "float32", dev)]
            timer = lib.time_evaluator("main", dev, number=20, repeat=5, min_repeat_ms=50)
            best[name] = min(best[name], timer(*args).median * 1e3)
    return best


def trial_curve(log_dir: Path, op: str, start_wall: float) -> dict:
    """From meta_schedule's task log: per trial its time, best-so-far, seconds since the tune started."""
    logs = sorted((database_folder(log_dir) / "search" / op / "logs").glob("*task_0*.log"))
    trials = []
    for line in logs[0].read_text().splitlines() if logs else []:
        match = TRIAL_LINE.match(line)
        if match:
            stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
            trials.append((int(match.group(2)), float(match.group(3)) / 1e3, stamp - start_wall))
    if not trials:
        return {}
    best = min(ms for _, ms, _ in trials)
    best_so_far, reached = float("inf"), None
    curve = []
    for index, ms, seconds in trials:
        best_so_far = min(best_so_far, ms)
        curve.append({"trial": index, "ms": ms, "best_ms": best_so_far, "s": seconds})
        if reached is None and best_so_far <= best / 0.95:
            reached = {"trial": index, "s": seconds}
    return {"best_ms": best, "reach_95pct": reached, "first_trial_s": trials[0][2], "curve": curve}


def run_op(name: str, trials: int, folder: Path) -> dict:
    cpu = TargetSpec("cpu")
    mod, inputs, reference = op_graph(name)
    log_dir = folder / f"log_{name}"
    budget = SearchBudget(trials_per_op=trials, max_ops=1, trials_per_batch=16, population=128, evolve_iterations=2)
    start_wall, start = time.time(), time.perf_counter()
    (result,) = tune_generic_ops(mod, cpu, log_dir, budget)
    tune_s = time.perf_counter() - start
    kernel_ms = kernels_side_by_side(mod, log_dir, inputs, reference)
    build = build_library(mod, cpu, folder / f"{name}_with_log.so", tuning_logs=[log_dir])
    return {
        "op": name,
        "kernel": result.name,
        "trials": result.trials,
        "tune_s": tune_s,
        "runner_default_ms": (result.default_s or float("nan")) * 1e3,
        "runner_best_ms": (result.best_s or float("nan")) * 1e3,
        "default_ms": kernel_ms["default"],
        "tuned_ms": kernel_ms["tuned"],
        "speedup": kernel_ms["default"] / kernel_ms["tuned"],
        "build_applies_the_record": build.tuned_kernels == [result.name],
        "meta_schedule_log": trial_curve(log_dir, result.name, start_wall),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="scores,layer_norm", help="comma list of: scores, layer_norm")
    parser.add_argument("--trials", type=int, default=64, help="meta_schedule trials per op")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tune-generic-ops-") as tmp:
        rows = [run_op(name, args.trials, Path(tmp)) for name in args.ops.split(",")]
    print(f"load average before {load_before}, after {os.getloadavg()}")
    header = ("op", "default ms", "tuned ms", "speedup", "trials", "95% at", "tune s", "applied")
    print("{:12s} {:>10s} {:>9s} {:>8s} {:>6s} {:>14s} {:>7s} {:>8s}".format(*header))
    for r in rows:
        reach = r["meta_schedule_log"].get("reach_95pct") or {}
        at = f"#{reach.get('trial')} ({reach.get('s', 0):.0f} s)" if reach else "-"
        print(
            f"{r['op']:12s} {r['default_ms']:10.4f} {r['tuned_ms']:9.4f} {r['speedup']:7.2f}x {r['trials']:6d} "
            f"{at:>14s} {r['tune_s']:7.0f} {r['build_applies_the_record']!s:>8s}"
        )
    env = environment(extra={"load_average_before": load_before, "load_average_after": os.getloadavg()})
    path = write_results(RESULTS, "tune_generic_ops", {"environment": env, "ops": rows, "trials_per_op": args.trials})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
