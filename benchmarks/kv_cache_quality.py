"""KV-cache quality on the demo model: greedy agreement with the fp16 cache and held-out perplexity, per
KV format.

The demo Llama (examples/tiny_llama) is compiled for the CPU once per --kv-cache-dtype. Each artifact
generates greedily (64 new tokens, no stop token) from the same prompts: the demo's and the first tokens
of held-out docstrings (the last 5 % of the standard library's docstrings, which the model never trained
on; `examples/train_tiny_llama.py`). Against the fp16 cache's continuation it records, per prompt, the
tokens that agree before the first difference and the fraction of the 64 positions that agree. It also
records each format's perplexity on held-out docstrings (teacher-forced through the KV cache:
`DecoderModel.token_logprobs`), so a divergence can be told apart from a loss of quality (two greedy
continuations may part at a near-tie and both be fine).

    .venv/bin/python benchmarks/kv_cache_quality.py             # auto fp16 int8 int4 and the int2-kitty variants
    .venv/bin/python benchmarks/kv_cache_quality.py --formats fp16 int4 --prompts 8 --quick

int2-kitty keeps each sequence's first 32 and last 128 tokens (and a group still waiting) in full
precision, so at its defaults nothing of a 72-token continuation or a 128-token text is ever 2-bit: the
variants `int2-kitty-w32` (sink 16, window 32, pages of 32 tokens), `int2-kitty-w32-noboost` (the same
without the 4-bit key channels: KIVI-style per-channel 2-bit) and `int2-oscar-w32` (the same sink, window
and pages; rotations calibrated on 64 docstrings of the training split) put most of these short sequences
in 2-bit pages (`int2-oscar-w32-hadamard`: the same with Hadamard-only rotations, the ablation), and the
perplexity texts are scored up to --ppl-tokens 256 tokens. Each record states the share of the cached
tokens that sit in 2-bit pages at the sequences' longest (greedy / perplexity): the results file was run
with --prompt-tokens 48 so that the greedy continuations reach 2-bit pages too (the ablation's file,
kv_cache_quality_tiny_llama_oscar_ablation.json, with --formats fp16 int2-kitty-w32 int2-oscar-w32
int2-oscar-w32-hadamard). `int2-kitty-w32-q8` / `int2-oscar-w32-q8` are kitty-w32 / oscar-w32 with
`int8_query` (q·k as int8 x 2-bit dot products on the CPU; kv_cache_quality_tiny_llama_int8_query.json, with
--formats fp16 int2-kitty-w32 int2-kitty-w32-q8 int2-oscar-w32 int2-oscar-w32-q8 --prompt-tokens 48).

Writes JSON (default benchmarks/results/kv_cache_quality_tiny_llama.json) with versions and commit.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "tiny_llama"
DEMO_PROMPT = "Return a new list containing"
BASELINE = "fp16"
# label -> KVCacheConfig options: the int2-kitty variants that quantise the short sequences of this model
VARIANTS = {
    # (int8_query False: q·k in fp32 over the dequantised keys, the format's own quality; -q8 below: the default)
    "int2-kitty-w32": {"format": "int2-kitty", "sink": 16, "window": 32, "page_tokens": 32, "int8_query": False},
    "int2-kitty-w32-noboost": {
        "format": "int2-kitty", "boost_fraction": 0.0, "sink": 16, "window": 32, "page_tokens": 32,
        "int8_query": False,
    },
    # per-token 2-bit needs no page group; pages of 32 all the same, so its 2-bit share is kitty-w32's
    "int2-oscar-w32": {"format": "int2-oscar", "sink": 16, "window": 32, "page_tokens": 32, "int8_query": False},
    # the ablation: the same quantiser with Hadamard-only rotations (no calibrated eigenvectors)
    "int2-oscar-w32-hadamard": {
        "format": "int2-oscar", "sink": 16, "window": 32, "page_tokens": 32, "int8_query": False,
    },
    # the same with q·k as int8 x 2-bit dot products (--kv-int8-query: q rounded to int8 per token and head)
    "int2-kitty-w32-q8": {"format": "int2-kitty", "sink": 16, "window": 32, "page_tokens": 32, "int8_query": True},
    "int2-oscar-w32-q8": {"format": "int2-oscar", "sink": 16, "window": 32, "page_tokens": 32, "int8_query": True},
}  # fmt: skip
HADAMARD_ONLY = ("int2-oscar-w32-hadamard",)
CALIBRATION_DOCS = 64  # int2-oscar's rotations: calibrated on this many of the model's training docstrings


def training_docstrings(count: int) -> list[str]:
    """`count` docstrings of the demo's training split (never the held-out ones), one line each, cut to their
    first 100 words (the model's context is 512 tokens)."""
    sys.path.insert(0, str(ROOT / "examples"))
    from train_tiny_llama import stdlib_docstrings

    docs = stdlib_docstrings()
    train = docs[: len(docs) - len(docs) // 20]
    return [" ".join(d.split()[:100]) for d in train[:: max(1, len(train) // count)][:count]]


def held_out_docstrings() -> list[str]:
    """The docstrings the demo model never trained on (its training script's split)."""
    sys.path.insert(0, str(ROOT / "examples"))
    from train_tiny_llama import stdlib_docstrings

    docs = stdlib_docstrings()
    return docs[-len(docs) // 20 :]


def hadamard_rotations_file(path: Path) -> Path:
    """A calib.npz for the demo whose R_K and R_V are the normalised Hadamard matrix in every layer and head."""
    import numpy as np

    from tensorpress.compiler.calibration.kv_rotations import hadamard, import_unrotated, model_id, save_kv_rotations

    config, unrotated = import_unrotated(DEMO, None)
    h = np.repeat(hadamard(config.head_dim).astype(np.float32)[None], config.num_kv_heads, axis=0)
    rotations = {f"kv_rotations.{i}.{kind}": h for i in range(config.num_layers) for kind in ("key", "value")}
    save_kv_rotations(path, rotations, model_id(unrotated.params, config))
    return path


def agreement(tokens: list[int], baseline: list[int]) -> dict:
    prefix = next((i for i, (a, b) in enumerate(zip(tokens, baseline)) if a != b), min(len(tokens), len(baseline)))
    same = sum(a == b for a, b in zip(tokens, baseline)) / len(baseline)
    return {"agree_before_first_difference": prefix, "positions_agreeing": same, "first_token_equal": prefix > 0}


def two_bit_share(policy, lengths: list[int]) -> float:
    """Share of the cached tokens of sequences of `lengths` that sit in 2-bit pages (a page-granular KV
    format's `PageQuantisationPolicy`; None: none do)."""
    if policy is None:
        return 0.0
    return sum(policy.groups_due(n) * policy.group_pages * policy.page_size for n in lengths) / sum(lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--formats", nargs="+", default=["auto", "fp16", "int8", "int4", "int2-kitty", "int2-oscar", *VARIANTS]
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=24, help="held-out prompts besides the demo's")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--ppl-texts", type=int, default=48, help="held-out docstrings scored for perplexity")
    parser.add_argument("--ppl-tokens", type=int, default=256, help="tokens scored per docstring (at most)")
    parser.add_argument("--quick", action="store_true", help="4 prompts, 8 texts: a smoke run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kv_cache_quality_tiny_llama.json"))
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.ppl_texts = 4, 8
    formats = list(dict.fromkeys([BASELINE, *args.formats]))

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from harness import environment, write_json
    from tokenizers import Tokenizer

    import tensorpress
    from tensorpress.compiler.compression_configs import KVCacheConfig
    from tensorpress.runtime.decoder import DecoderModel
    from tensorpress.runtime.loaded_artifact import load_artifact
    from tensorpress.runtime.page_quantisation import PageQuantisationPolicy

    docs = held_out_docstrings()
    tokenizer = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        calibration = Path(tmp) / "calibration.txt"
        calibration.write_text("\n".join(training_docstrings(CALIBRATION_DOCS)) + "\n")
        for kv in formats:
            path = Path(tmp) / f"{kv}.tpk"
            kv_cache = KVCacheConfig(**VARIANTS[kv]) if kv in VARIANTS else KVCacheConfig(kv)
            calibrated = getattr(kv_cache.kv_cache_format(), "attention_rotations", False)
            data = calibration if calibrated else None
            if kv in HADAMARD_ONLY:
                data = hadamard_rotations_file(Path(tmp) / "hadamard.npz")
            tensorpress.compile(DEMO, path, target="cpu", kv_cache=kv_cache, calibration=data)
            models[kv] = DecoderModel(load_artifact(path, "cpu"), max_total_tokens=8192, tokenizer=tokenizer)
    encode = models[BASELINE].encode
    # prompts: the demo's, then held-out docstrings' first tokens (spread over the held-out files)
    step = max(1, len(docs) // max(1, args.prompts))
    prompts = [encode(DEMO_PROMPT)] + [encode(d)[: args.prompt_tokens] for d in docs[::step][: args.prompts]]
    texts = [ids[: args.ppl_tokens] for ids in (encode(d) for d in docs[1::step][: args.ppl_texts]) if len(ids) > 8]

    records = {}
    baseline_tokens = None
    for kv in formats:
        model = models[kv]
        start = time.perf_counter()
        generated = model.generate(prompts, max_new_tokens=args.new_tokens, stop_ids=[])
        logprobs = model.token_logprobs(texts)
        scored = sum(len(lp) for lp in logprobs)
        nll = -sum(float(lp.sum()) for lp in logprobs) / scored
        if kv == BASELINE:
            baseline_tokens = generated
        assert baseline_tokens is not None
        per_prompt = [agreement(g, b) for g, b in zip(generated, baseline_tokens)]
        policy = PageQuantisationPolicy.from_section(model.section)

        records[kv] = {
            "bytes_per_token": model.section["bytes_per_token"],
            "bits_per_element": model.section["kv_cache"]["bits"],
            "full_precision_window": model.section.get("page_quantisation"),  # page-granular formats
            "two_bit_share_greedy": two_bit_share(policy, [len(p) + args.new_tokens - 1 for p in prompts]),
            "two_bit_share_perplexity": two_bit_share(policy, [len(t) - 1 for t in texts]),
            "held_out_perplexity": math.exp(nll),
            "scored_tokens": scored,
            "first_token_equal": sum(p["first_token_equal"] for p in per_prompt) / len(per_prompt),
            "mean_agree_before_first_difference": sum(p["agree_before_first_difference"] for p in per_prompt)
            / len(per_prompt),
            "all_64_equal": sum(p["agree_before_first_difference"] == args.new_tokens for p in per_prompt),
            "mean_positions_agreeing": sum(p["positions_agreeing"] for p in per_prompt) / len(per_prompt),
            "per_prompt": per_prompt,
            "seconds": time.perf_counter() - start,
        }
        r = records[kv]
        print(
            f"{kv:>22}: {r['bytes_per_token']:5d} B/token  perplexity {r['held_out_perplexity']:7.3f}  "
            f"first token equal {r['first_token_equal']:.2f}  agree before first difference "
            f"{r['mean_agree_before_first_difference']:5.1f}/{args.new_tokens}  all equal "
            f"{r['all_64_equal']}/{len(prompts)}  positions agreeing {r['mean_positions_agreeing']:.3f}  "
            f"2-bit share {r['two_bit_share_greedy']:.2f} / {r['two_bit_share_perplexity']:.2f}"
        )

    payload = {
        "benchmark": "kv_cache_quality",
        "model": str(DEMO.relative_to(ROOT)),
        "baseline": BASELINE,
        "new_tokens": args.new_tokens,
        "prompts": len(prompts),
        "prompt_tokens": args.prompt_tokens,
        "perplexity_texts": len(texts),
        "int2_oscar_calibration": f"{CALIBRATION_DOCS} docstrings of the training split, one prompt each",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": environment(),
        "records": records,
    }
    print(f"wrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
