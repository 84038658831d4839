"""CPU decode attention: this checkout's llvm schedule (`schedules/kv_attention_cpu.py`) against another
checkout's copy of that file (--baseline), in one process, on the same data, timed in turns.

On a machine shared with other jobs, two runs of `kv_attention_cpu.py` one after the other can differ by 2x
(the load moves in between); here run r of every kernel comes before run r + 1 of any, so the load falls
on both schedules alike. Both are built from this checkout's definition (`paged_attention_func`) for the
target `tensorpress compile --target cpu` builds for, over the same caches as `kv_attention_cpu.py`
(`_inputs`: random pages, int2 formats with their full-precision sink and window). Before timing, each
pair's outputs are checked bit for bit (a schedule that only reorders loops keeps every sum's order).
Reported: median wall and CPU (process) time per kernel, and fp32 / format ratios per schedule.

    git worktree add --detach /tmp/base main   # the baseline's file; this checkout's venv runs both
    .venv/bin/python benchmarks/kv_attention_cpu_schedule_ab.py --baseline /tmp/base/schedules/kv_attention_cpu.py
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_schedule(path: str):
    """The schedule module in `path` (it imports the rest from this checkout's tensorpress)."""
    spec = importlib.util.spec_from_file_location("baseline_kv_attention_cpu", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(schedule, fmt, heads: int, kv_heads: int):
    import kv_attention_cpu as bench
    import tvm

    from tensorpress.compiler.targets import TargetSpec
    from tensorpress.schedules.kv_attention import paged_attention_func

    target = TargetSpec("cpu").tvm_target()
    with target:
        func = paged_attention_func(fmt, heads, kv_heads, bench.HEAD_DIM, bench.PAGE, "float32", "decode")
        scheduled = schedule.schedule_attention(func).mod["main"].with_attr("global_symbol", "decode")
        return tvm.compile(tvm.IRModule({"decode": scheduled}), target=target)["decode"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="path of the baseline's kv_attention_cpu.py")
    parser.add_argument("--formats", nargs="+", default=["fp32", "int4", "int2-kitty", "int2-oscar"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 8192, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--groups", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kv_attention_cpu_schedule_ab.json"))
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kv_attention_cpu as bench
    from harness import environment, write_json

    from tensorpress.compiler.formats import get_kv_cache_format
    from tensorpress.schedules import kv_attention_cpu as ours

    schedules = {"baseline": load_schedule(args.baseline), "ours": ours}
    load_at_start = os.getloadavg()
    rng = np.random.default_rng(0)
    records = []
    for group in args.groups:
        kv_heads = bench.HEADS // group
        formats = {name: get_kv_cache_format(name) for name in args.formats}
        kernels = {
            (name, which): build(schedule, fmt, bench.HEADS, kv_heads)
            for name, fmt in formats.items()
            for which, schedule in schedules.items()
        }
        for context in args.contexts:
            for batch in args.batches:
                results = run_case(formats, kernels, list(schedules), (group, batch, context), rng, args.runs)
                line = " | ".join(
                    f"{name} {results[name + '/baseline']['wall_median_ms']:.1f}"
                    f" -> {results[name + '/ours']['wall_median_ms']:.1f}"
                    for name in formats
                )
                print(f"T={context} B={batch} G={group} (wall ms, baseline -> ours; load {os.getloadavg()[0]:.1f}):")
                print(f"    {line}")
                records.append(
                    {"context": context, "batch": batch, "group": group, "load": os.getloadavg(), "results": results}
                )
    payload = {
        "benchmark": "kv_attention_cpu_schedule_ab",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": args.threads,
        "runs": args.runs,
        "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "environment": environment(extra={"cpu_count": os.cpu_count()}),
        "records": records,
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}")


def run_case(formats: dict, kernels: dict, schedules: list, case: tuple, rng, runs: int) -> dict:
    """Median wall and CPU ms of every (format, schedule) kernel on one case's inputs, timed in turns,
    after checking each format's two outputs bit for bit; with fp32 among the formats, fp32 / each."""
    import kv_attention_cpu as bench
    import numpy as np

    group, batch, context = case
    calls = {}
    for name, fmt in formats.items():
        cache, q, positions, seq_slot, block_table, _ = bench._inputs(fmt, batch, context, bench.HEADS // group, rng)
        outs = []
        for which in schedules:
            call, out = bench._call(kernels[(name, which)], cache, q, positions, seq_slot, block_table)
            call()
            outs.append(out.numpy().view(np.uint32))
            calls[(name, which)] = call
        assert np.array_equal(*outs), f"{name}: the schedules' outputs differ (G{group} B{batch} T{context})"
    wall: dict = {key: [] for key in calls}
    cpu: dict = {key: [] for key in calls}
    for _ in range(runs):
        for key, call in calls.items():
            c, t = time.process_time(), time.perf_counter()
            call()
            cpu[key].append(1e3 * (time.process_time() - c))
            wall[key].append(1e3 * (time.perf_counter() - t))
    results = {
        f"{name}/{which}": {
            "wall_median_ms": float(np.median(wall[(name, which)])),
            "cpu_median_ms": float(np.median(cpu[(name, which)])),
        }
        for name, which in calls
    }
    if "fp32" in formats:
        for name, which in calls:
            entry = results[f"{name}/{which}"]
            entry["fp32_over_this"] = results[f"fp32/{which}"]["wall_median_ms"] / entry["wall_median_ms"]
    return results


if __name__ == "__main__":
    main()
