"""GPU decode throughput: our runtime vs transformers fp16 eager, same weights, same process.

    python3 benchmarks/decode_throughput_gpu.py --kit .device-kit --out "$OUT"    (normally via kit/run.py)

The model is Llama-7B-shaped (hidden 4096, 32 heads, MLP 11008, 32 layers, vocab 32000) with random
weights: the kit carries our compiled libraries only (`store_weights=False`) and the config.json. Here
transformers builds the model on the GPU in fp16 from a fixed seed; our dense fp16 artifact takes those
very tensors (zero-copy, by their Hugging Face names), so both sides run the same weights. The fp6
artifact's packed planes are random bits and its scales random (one array per shape, copied per
layer); its non-linear weights and LM head are transformers' tensors. Its tokens are not comparable
with transformers', its throughput is.

For each batch B and context T: B random prompts of T tokens, NEW greedy tokens. Decode tokens/s counts
the tokens of decode steps only (prefill excluded): ours from the runtime's own timers (the host work of
each step included: inputs to the GPU, logits back, argmax), transformers' by timing each step of its
KV-cached greedy loop (the forward and the argmax, synchronised). The sides run one after the other.
Bandwidth: bytes a decode step must read (every weight once + the KV cache of every sequence) / step
time, against the datasheet and the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
WARMUP_TOKENS = 3
PREFILL_SLICE_TOKENS = 4096  # prefill calls of at most this many tokens bound the attention workspace
PACK_ON_DEVICE_LIMIT = 100_000_000  # linear-layer elements up to which FPx weights are packed for real


def build_transformers(folder: Path, seed: int, device, dtype):
    """transformers' Llama from config.json, random init (seed), built directly on `device` in `dtype`."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def our_weights(artifact: Path, hf_state: dict, device_kind: str, seed: int) -> dict:
    """{name: tensor} for the artifact's parameters, from transformers' tensors `hf_state`.

    A parameter stored as transformers holds it (same name, shape, dtype: the CUDA dense fp16 format,
    norms, embeddings) is that very tensor. A linear layer stored otherwise is packed from
    transformers' weight with the format's own packer when the model is small (the dry run: CPU
    panel layouts, FPx planes); for the 7B-shaped model its FPx planes are random bits and its scales
    ~0.0025 (weights with about the spread of transformers' init; packing 6 GB in numpy would take
    minutes). On the CPU everything goes as numpy."""
    import numpy as np

    from tensorpress.compiler.formats import get_weight_format
    from tensorpress.runtime.artifact import open_artifact
    from tensorpress.runtime.loaded_artifact import weight_specs

    opened = open_artifact(artifact, verify=False)
    specs = weight_specs(opened)
    layers = {layer["weight"]: layer for layer in opened.manifest["layers"]}
    small = sum(int(np.prod(layer["shape"])) for layer in layers.values()) <= PACK_ON_DEVICE_LIMIT
    search = opened.manifest["recipe"].get("scale_search") or "absmax"
    as_array = (lambda t: t) if device_kind == "cuda" else (lambda t: t.detach().numpy())
    weights = {}
    for name, layer in layers.items():
        hf = hf_state[name]
        if specs.get(name) == (tuple(hf.shape), str(hf.dtype).removeprefix("torch.")):
            weights[name] = as_array(hf)
        elif small:
            packed = get_weight_format(layer["format"], search).pack(hf.detach().float().cpu().numpy())
            for array_name, array in packed.arrays.items():
                weights[name if len(packed.arrays) == 1 else f"{name}.{array_name}"] = array
    rng = np.random.default_rng(seed)
    made: dict[tuple, np.ndarray] = {}
    for name, (shape, dtype) in specs.items():
        if name in weights:
            continue
        if name in hf_state:
            weights[name] = as_array(hf_state[name])
            continue
        if (shape, dtype) not in made:
            if np.dtype(dtype).kind == "u":
                made[shape, dtype] = rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype, endpoint=True)
            else:
                made[shape, dtype] = (0.0025 * (0.5 + rng.random(shape))).astype(dtype)
        weights[name] = made[shape, dtype]
    return weights


def hf_decode(model, prompts, new_tokens: int, sync) -> tuple[float, list[list[int]]]:
    """transformers' KV-cached greedy loop (what generate() runs); seconds of the decode steps only."""
    import torch

    with torch.no_grad():
        out = model(input_ids=prompts, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        tokens, seconds = [token], 0.0
        for _ in range(new_tokens - 1):
            sync()
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            seconds += time.perf_counter() - start
            tokens.append(token)
        del out, cache
    return seconds, torch.cat(tokens, 1).tolist()


def _agreeing_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def first_step_error(ours, hf, prompts, device) -> float:
    """max |our logits - transformers' logits| / max |transformers' logits| after the prompts."""
    import numpy as np
    import torch

    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(prompts).to(device), logits_to_keep=1).logits[:, -1]
    theirs = theirs.double().cpu().numpy()
    return float(np.abs(ours.next_token_logits(prompts.tolist()) - theirs).max() / np.abs(theirs).max())


def step_bytes(manifest: dict, config: dict, batch: int, context: int) -> int:
    """Bytes one decode step must read: every weight once (as stored) + K and V of every cached token."""
    hidden, layers = config["hidden"], config["layers"]
    weights = sum(layer["stored_bytes"] for layer in manifest["layers"])  # every linear layer, LM head included
    weights += (2 * layers + 1) * hidden * 2 + batch * hidden * 2  # RMSNorm weights, one embedding row each
    kv = batch * context * layers * 2 * config["kv_heads"] * (hidden // config["heads"]) * 2
    return weights + kv


@dataclass
class Sides:
    """Both models and what a measurement needs to know about the device and the artifact."""

    ours: Any
    hf: Any
    device: Any
    sync: Any
    artifact_manifest: dict
    config: dict
    peak: float | None
    copy_bw: float | None


def measure(side: Sides, fmt: str, batch: int, context: int) -> dict:
    """One (weights, batch, context) row: both sides' decode tokens/s, step times, bandwidth shares."""
    import numpy as np
    import torch

    config, new = side.config, side.config["new_tokens"]
    rng = np.random.default_rng(batch * 100_000 + context)
    prompts = rng.integers(3, config["vocab"], (batch, context))
    side.ours.generate(prompts[:, :16].tolist(), max_new_tokens=WARMUP_TOKENS, stop_ids=[])
    our_tokens = side.ours.generate(prompts.tolist(), max_new_tokens=new, stop_ids=[])
    stats = side.ours.last_stats
    hf_decode(side.hf, torch.from_numpy(prompts[:, :16]).to(side.device), WARMUP_TOKENS, side.sync)
    hf_seconds, hf_tokens = hf_decode(side.hf, torch.from_numpy(prompts).to(side.device), new, side.sync)
    our_rate = stats.decode_tokens / stats.decode_seconds
    hf_rate = batch * (new - 1) / hf_seconds
    nbytes = step_bytes(side.artifact_manifest, config, batch, context + new // 2)
    our_step, hf_step = stats.decode_seconds / (new - 1), hf_seconds / (new - 1)
    share = lambda step, peak: round(nbytes / step / peak, 3) if peak else None  # noqa: E731
    row = {
        "weights": fmt,
        "batch": batch,
        "context": context,
        "tensorpress_tokens_per_s": round(our_rate, 1),
        "transformers_tokens_per_s": round(hf_rate, 1),
        "speedup": round(our_rate / hf_rate, 3),
        "tensorpress_step_ms": round(our_step * 1e3, 3),
        "transformers_step_ms": round(hf_step * 1e3, 3),
        "tensorpress_prefill_s": round(stats.prefill_seconds, 3),
        "bytes_per_step": nbytes,
        "tensorpress_fraction_of_datasheet_bw": share(our_step, side.peak),
        "tensorpress_fraction_of_copy_bw": share(our_step, side.copy_bw),
        "transformers_fraction_of_datasheet_bw": share(hf_step, side.peak) if fmt == "fp16" else None,
    }
    if fmt == "fp16":  # the same weights: first-step logits (batch 1) and how far greedy agrees
        if batch == 1:
            row["first_step_logits_max_rel_error"] = first_step_error(side.ours, side.hf, prompts[:1], side.device)
        row["greedy_sequences_equal"] = sum(a == b for a, b in zip(our_tokens, hf_tokens))
        row["greedy_tokens_equal_before_first_difference"] = [
            _agreeing_prefix(a, b) for a, b in zip(our_tokens, hf_tokens)
        ]
    print(
        f"{fmt} B={batch:<3} T={context:<5} ours {our_rate:9.1f} tok/s  transformers {hf_rate:9.1f} tok/s  "
        f"x{our_rate / hf_rate:5.2f}  {row['tensorpress_fraction_of_datasheet_bw'] or 0:.0%} of HBM",
        flush=True,
    )
    return row


def run(kit: Path, out: Path, commit: str | None = None) -> Path:
    import torch

    import tensorpress.runtime
    from benchmarks.harness import datasheet_bandwidth, environment, measure_copy_bandwidth, write_results
    from tensorpress.runtime.artifact import open_artifact

    manifest = json.loads((kit / "manifest.json").read_text())
    dry = bool(manifest["dry"])
    section = manifest["decoders"]["throughput"]
    config = section["config"]
    device_kind = "cpu" if dry else "cuda"
    device = torch.device(device_kind)
    sync = torch.cuda.synchronize if device_kind == "cuda" else (lambda: None)
    hf_dtype = torch.float32 if dry else torch.float16  # CPU fp16 is slow; the dry run proves plumbing only
    start = time.perf_counter()
    hf = build_transformers(kit / section["hf_folder"], config["seed"], device, hf_dtype)
    hf_state = dict(hf.state_dict())
    setup_seconds = {"transformers_init": round(time.perf_counter() - start, 1)}
    copy_bw = measure_copy_bandwidth(device)
    props_name = torch.cuda.get_device_properties(0).name if device_kind == "cuda" else "cpu"
    peak = datasheet_bandwidth(props_name)
    max_tokens = max(config["batches"]) * (max(config["contexts"]) + config["new_tokens"])
    rows = []
    for fmt in config["formats"]:
        artifact = kit / section["artifacts"][fmt]
        artifact_manifest = open_artifact(artifact, verify=False).manifest
        start = time.perf_counter()
        state = hf_state if not dry else {k: v.half() for k, v in hf_state.items()}
        weights = our_weights(artifact, state, device_kind, config["seed"])
        ours = tensorpress.runtime.load(
            artifact,
            device=device_kind,
            weights=weights,
            max_total_tokens=max_tokens,
            max_prefill_tokens=100 if dry else PREFILL_SLICE_TOKENS,  # dry: slices of the small prompts too
        )
        setup_seconds[f"load_{fmt}"] = round(time.perf_counter() - start, 1)
        for context in config["contexts"]:
            for batch in config["batches"]:
                side = Sides(ours, hf, device, sync, artifact_manifest, config, peak, copy_bw)
                try:
                    row = measure(side, fmt, batch, context)
                except Exception as err:  # noqa: BLE001 - e.g. out of memory: keep the other rows
                    row = {
                        "weights": fmt,
                        "batch": batch,
                        "context": context,
                        "error": f"{type(err).__name__}: {err}"[:400],
                    }
                    print(f"{fmt} B={batch} T={context}: {row['error']}", flush=True)
                if device_kind == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
        del ours, weights
        if device_kind == "cuda":
            torch.cuda.empty_cache()
    payload = {
        "benchmark": "decode_throughput_gpu",
        "environment": environment(commit=commit),
        "dry_run": dry,
        "note": (
            "DRY RUN: CPU-built artifacts of a small stand-in model on the CPU, transformers in fp32; "
            "the numbers mean nothing, the run proves the plumbing"
        )
        if dry
        else "Llama-7B-shaped model, random weights; decode steps only; host work of each step included",
        "model": config,
        "transformers_dtype": str(hf_dtype).removeprefix("torch."),
        "copy_bandwidth_bytes_per_s": copy_bw,
        "datasheet_bandwidth_bytes_per_s": peak,
        "setup_seconds": setup_seconds,
        "rows": rows,
    }
    return write_results(out, "decode_throughput_gpu", payload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", type=Path, default=ROOT / ".device-kit")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    manifest = json.loads((args.kit / "manifest.json").read_text())
    path = run(args.kit, args.out, manifest["commit"]["sha"])
    print(f"decode throughput -> {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
