"""A loaded model shared by threads: throughput of three designs for a multi-threaded caller (CPU).

    per_thread_vm   one model shared; each thread runs its own VM state (what the runtime does)
    one_locked_vm   one model shared; every compiled call holds one lock around a single VM
    model_per_thread each thread loads its own copy of the model (weights loaded T times)

For T caller threads, each makes CALLS calls (a graph model's run on a batch of BATCH rows, or a
decoder's greedy generate of NEW_TOKENS tokens), and the throughput is total calls (or tokens) / wall
seconds, best of REPEATS. Every answer is checked against the single-threaded one.

    .venv/bin/python benchmarks/runtime_threads_cpu.py                  # threads 1 2 4
    .venv/bin/python benchmarks/runtime_threads_cpu.py --threads 1 8 --calls 50

Writes JSON (default benchmarks/results/runtime_threads_cpu.json) with machine, versions and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import tensorpress
import tensorpress.runtime

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "runtime_threads_cpu.json"
REPEATS = 3
BATCH = 8
NEW_TOKENS = 16
DESIGNS = ("per_thread_vm", "one_locked_vm", "model_per_thread")


def one_locked_vm(model):
    """Make `model` run every compiled call on the loading thread's VM under one lock (the other design)."""
    loaded = model.loaded if hasattr(model, "loaded") else model.artifact
    vm, lock, functions = loaded.vm, threading.Lock(), {}

    def function(name):
        if name not in functions:
            run = vm[name]

            def locked(*args, run=run):
                with lock:
                    return run(*args)

            functions[name] = locked
        return functions[name]

    loaded.function = function  # shadows LoadedArtifact.function for this instance
    return model


def graph_artifact(folder: Path) -> Path:
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256)).eval()
    onnx_path = folder / "mlp.onnx"
    torch.onnx.export(
        mlp, (torch.randn(BATCH, 256),), str(onnx_path), input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    return tensorpress.compile(onnx_path, folder / "mlp.tpk").artifact


def decoder_artifact(folder: Path) -> Path:
    sys.path.insert(0, str(HERE))
    from decode_throughput_cpu import random_llama

    hf = random_llama("256x2", folder / "llama")
    artifact = folder / "llama.tpk"
    tensorpress.compile(hf, artifact, target="cpu", dtype="float32")
    return artifact


def throughput(artifact: Path, kind: str, design: str, threads: int, calls: int) -> float:
    """Calls (graph) or tokens (decoder) per second of `threads` threads, best of REPEATS."""
    shared = tensorpress.runtime.load(artifact)
    if design == "one_locked_vm":
        one_locked_vm(shared)
    models = [tensorpress.runtime.load(artifact) for _ in range(threads)] if design == "model_per_thread" else None
    if kind == "graph":
        x = np.random.default_rng(0).standard_normal((BATCH, 256)).astype(np.float32)
        expected = shared.run({"x": x})[0]

        def work(model):
            for _ in range(calls):
                assert np.array_equal(model.run({"x": x})[0], expected)

        per_call = 1
    else:
        prompt = np.random.default_rng(0).integers(3, 1000, 16).tolist()
        expected = shared.generate(prompt, max_new_tokens=NEW_TOKENS, stop_ids=[])

        def work(model):
            for _ in range(calls):
                assert model.generate(prompt, max_new_tokens=NEW_TOKENS, stop_ids=[]) == expected

        per_call = NEW_TOKENS
    best = 0.0
    for _ in range(REPEATS):
        workers = [threading.Thread(target=work, args=(models[i] if models else shared,)) for i in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, threads * calls * per_call / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--calls", type=int, default=40, help="calls per thread (graph); decoder: a quarter")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from decode_throughput_cpu import git_commit

    rows = []
    with tempfile.TemporaryDirectory(prefix="tp-threads-") as tmp:
        artifacts = {"graph": graph_artifact(Path(tmp)), "decoder": decoder_artifact(Path(tmp))}
        for kind, artifact in artifacts.items():
            unit = "calls/s" if kind == "graph" else "tokens/s"
            calls = args.calls if kind == "graph" else max(1, args.calls // 4)
            for threads in args.threads:
                row = {"model": kind, "unit": unit, "threads": threads}
                for design in DESIGNS:
                    row[design] = round(throughput(artifact, kind, design, threads, calls), 1)
                rows.append(row)
                print(
                    f"{kind:8s} {threads} threads: " + "   ".join(f"{d} {row[d]:9.1f}" for d in DESIGNS) + f" {unit}",
                    flush=True,
                )
    result = {
        "benchmark": "runtime_threads_cpu",
        "designs": {
            "per_thread_vm": "one model shared, each thread its own VM state (the runtime's design)",
            "one_locked_vm": "one model shared, one lock around a single VM",
            "model_per_thread": "each thread loads its own model",
        },
        "graph_model": f"MLP 256-1024-256 (ReLU), float32, batch {BATCH}",
        "decoder_model": f"random Llama 256x2, float32, greedy generate of {NEW_TOKENS} tokens from 16",
        "rows": rows,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)),
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),  # a shared machine is noisy
        },
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
