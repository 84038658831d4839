"""A CNN at batch 1 on the CPU: tensorpress against onnxruntime's default CPU session, side by side.

The same ONNX file (a classifier from `tests/classifier_models.py`, random weights, exported from torch
with a fixed batch) is compiled with `tensorpress.compile(..., target="cpu")` and run with
`tensorpress.runtime.load(...).run(...)` (numpy in, numpy out), and run with
`onnxruntime.InferenceSession(path)` (its defaults: all graph optimisations, its own thread count).
Each round times one tensorpress call and one onnxruntime call on the same input, after a short pause;
the figure per side is the fastest round (this machine is shared: the minimum is the least disturbed),
the median is reported beside it. Ratio = tensorpress / onnxruntime (goal: <= 1.5). The outputs are
checked against each other before timing.

    .venv/bin/python benchmarks/cnn_cpu_vs_onnxruntime.py                        # ResNet-50, 224x224
    .venv/bin/python benchmarks/cnn_cpu_vs_onnxruntime.py --models resnet50,mobilenet_v2 --batch 1
    .venv/bin/python benchmarks/cnn_cpu_vs_onnxruntime.py --small --rounds 5     # a quick check it runs
    .venv/bin/python benchmarks/cnn_cpu_vs_onnxruntime.py --threads 1            # one thread on each side

Threads: by default each side uses its own default (tensorpress: every CPU this process may use;
onnxruntime: its own choice). On a machine shared with other jobs, thread pools wait for cores and a
batch-1 CNN (many short kernels) suffers most; --threads N gives both sides N threads.

Writes benchmarks/results/cnn_cpu_vs_onnxruntime_<device>_<time>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
PAUSE_S = 0.05


def _classifier_models():
    """tests/classifier_models.py, loaded by path (the tests folder is not a package)."""
    spec = importlib.util.spec_from_file_location("classifier_models", ROOT / "tests" / "classifier_models.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def measure(name: str, batch: int, small: bool, rounds: int, folder: Path, threads: int | None) -> dict:
    import onnxruntime as ort

    import tensorpress

    path, side = _classifier_models().export_classifier(name, folder, batch=batch, full_size=not small)
    start = time.perf_counter()
    report = tensorpress.compile(path, folder / f"{name}.tpk", target="cpu")
    compile_s = time.perf_counter() - start
    model = tensorpress.runtime.load(report.artifact)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, side, side)).astype(np.float32)
    ours = lambda: model.run({"x": x})  # noqa: E731
    theirs = lambda: session.run(None, {"x": x})  # noqa: E731
    (got,), (want,) = ours(), theirs()
    error = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
    for _ in range(3):  # warm-up: thread pools, caches, first-call allocations
        ours(), theirs()
    samples: dict[str, list[float]] = {"tensorpress": [], "onnxruntime": []}
    for _ in range(rounds):
        time.sleep(PAUSE_S)
        samples["tensorpress"].append(_time_once(ours))
        time.sleep(PAUSE_S)
        samples["onnxruntime"].append(_time_once(theirs))
    best = {side_: min(s) for side_, s in samples.items()}
    return {
        "model": name,
        "batch": batch,
        "input": [batch, 3, side, side],
        "full_size": not small,
        "compile_s": round(compile_s, 2),
        "max_relative_error": error,
        "min_ms": best,
        "median_ms": {side_: float(np.median(s)) for side_, s in samples.items()},
        "ratio": best["tensorpress"] / best["onnxruntime"],
        "rounds": rounds,
        "threads": threads or "default",
    }


def main(argv=None) -> int:
    from harness import environment, write_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50", help="comma-separated, of tests/classifier_models.py")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--small", action="store_true", help="the reduced test sizes (checks the script runs)")
    parser.add_argument("--threads", type=int, help="threads for both sides (default: each side's own)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.threads:  # before TVM loads: its thread pool reads it once
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import onnxruntime

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            row = measure(name, args.batch, args.small, args.rounds, Path(tmp), args.threads)
            rows.append(row)
            print(
                f"{name:14s} batch {args.batch}: tensorpress {row['min_ms']['tensorpress']:8.2f} ms, "
                f"onnxruntime {row['min_ms']['onnxruntime']:8.2f} ms (min of {args.rounds}), "
                f"ratio {row['ratio']:.2f}, max rel. error {row['max_relative_error']:.1e}"
            )
    payload = {"environment": environment(extra={"onnxruntime": onnxruntime.__version__}), "results": rows}
    print(f"wrote {write_results(args.out, 'cnn_cpu_vs_onnxruntime', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
