"""Greedy equality on the GPU: our decoder artifacts vs transformers fp32 and fp16 on the same weights.

    python3 benchmarks/kit/decoder_greedy.py --kit .device-kit --out "$OUT"      (normally via kit/run.py)

For each case of the kit (small random Llama / Qwen2 / OPT, tiny_llama dense fp16 and fp6): transformers
loads the case's Hugging Face folder in fp32 and in fp16 and generates greedily, one prompt at a time,
32 new tokens; our runtime loads the artifact and generates the same prompts one at a time (the first
two) and as one ragged batch (all four). Recorded: which sequences equal transformers' (fp32, fp16),
where the first difference is, and the first-step logits' max |difference| / max |logit| against both.
A case passes when its logits are within LOGITS_TOLERANCE of fp32 and every sequence equals the fp32
or the fp16 continuation. Needs torch + transformers and the kit's runtime (no TVM).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.kit.decoder_cases import (
    GREEDY_NEW_TOKENS,
    GREEDY_PROMPT_LENGTHS,
    GREEDY_PROMPT_SEED,
    LOGITS_TOLERANCE,
)

ROOT = Path(__file__).resolve().parents[2]


def hf_greedy(model, prompts: list[list[int]], new_tokens: int, device) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time, never stopping early."""
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
            out.append(gen[0, len(p) :].tolist())
    return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def check_case(case: dict, kit: Path, device: str) -> dict:
    import numpy as np
    import torch
    import transformers

    import tensorpress.runtime

    folder = (kit / case["folder"]) if case["in_kit"] else (ROOT / case["folder"])
    torch_device = torch.device(device)
    ours = tensorpress.runtime.load(kit / case["artifact"], device=device)
    vocab = int(ours.config["vocab_size"])
    rng = np.random.default_rng(GREEDY_PROMPT_SEED)
    prompts = [rng.integers(3, vocab, n).tolist() for n in GREEDY_PROMPT_LENGTHS]
    single = [ours.generate(p, max_new_tokens=GREEDY_NEW_TOKENS, stop_ids=[]) for p in prompts[:2]]
    batch = ours.generate(prompts, max_new_tokens=GREEDY_NEW_TOKENS, stop_ids=[])
    our_logits = ours.next_token_logits(prompts).astype(np.float64)
    result: dict = {"case": case, "prompt_lengths": list(GREEDY_PROMPT_LENGTHS), "new_tokens": GREEDY_NEW_TOKENS}
    references = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(torch_device).eval()
        references[dtype_name] = hf_greedy(hf, prompts, GREEDY_NEW_TOKENS, torch_device)
        with torch.no_grad():
            hf_logits = np.stack(
                [hf(torch.tensor([p], device=torch_device)).logits[0, -1].double().cpu().numpy() for p in prompts]
            )
        scale = float(np.abs(hf_logits).max())
        ref = references[dtype_name]
        result[dtype_name] = {
            "single_equal": [s == r for s, r in zip(single, ref[:2])],
            "batch_equal": [s == r for s, r in zip(batch, ref)],
            "first_difference": [first_difference(s, r) for s, r in zip(batch, ref)],
            "logits_max_rel_error": float(np.abs(our_logits - hf_logits).max() / scale),
        }
        del hf
    fp32, fp16 = (references[k][:2] + references[k] for k in ("fp32", "fp16"))
    sequences = list(zip(single + batch, fp32, fp16))
    result["every_sequence_equals_fp32_or_fp16"] = all(s in (r32, r16) for s, r32, r16 in sequences)
    within = result["fp32"]["logits_max_rel_error"] <= LOGITS_TOLERANCE
    result["passed"] = result["every_sequence_equals_fp32_or_fp16"] and within
    return result


def run(kit: Path, out: Path, device: str, commit: str | None = None, dry: bool = False) -> Path:
    from benchmarks.harness import environment, write_results

    manifest = json.loads((kit / "manifest.json").read_text())
    results = [check_case(case, kit, device) for case in manifest["decoders"]["greedy"]]
    payload = {
        "benchmark": "decoder_greedy_equality",
        "environment": environment(commit=commit),
        "dry_run": dry,
        "note": "dry run: CPU-built artifacts on the CPU; proves the plumbing only" if dry else None,
        "logits_tolerance": LOGITS_TOLERANCE,
        "cases": results,
        "passed": all(r["passed"] for r in results),
    }
    return write_results(out, "decoder_greedy", payload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", type=Path, default=ROOT / ".device-kit")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    manifest = json.loads((args.kit / "manifest.json").read_text())
    dry = bool(manifest["dry"])
    path = run(args.kit, args.out, "cpu" if dry else "cuda", manifest["commit"]["sha"], dry)
    result = json.loads(path.read_text())
    for r in result["cases"]:
        fp32, fp16 = r["fp32"], r["fp16"]
        print(
            f"{r['case']['name']:<16} {'ok ' if r['passed'] else 'BAD'} logits err fp32 "
            f"{fp32['logits_max_rel_error']:.1e} fp16 {fp16['logits_max_rel_error']:.1e}  batch == fp32 "
            f"{sum(fp32['batch_equal'])}/4, == fp16 {sum(fp16['batch_equal'])}/4",
            flush=True,
        )
    print(f"greedy equality: {'passed' if result['passed'] else 'FAILED'} -> {path.name}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
