"""Test support for decoders: tiny random Hugging Face folders, transformers' answers, compiling."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

TINY = dict(
    vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256
)


def make_hf_decoder(arch: str, folder: Path, seed: int = 0) -> Path:
    """Save a random-init LlamaForCausalLM / Qwen2ForCausalLM / OPTForCausalLM (2 layers, hidden 64)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        config = tf.LlamaConfig(**TINY, intermediate_size=128, num_key_value_heads=2, eos_token_id=2)
    elif arch == "qwen2":
        config = tf.Qwen2Config(**TINY, intermediate_size=128, num_key_value_heads=2, eos_token_id=2)
    elif arch == "opt":
        config = tf.OPTConfig(**TINY, ffn_dim=128, word_embed_proj_dim=64, eos_token_id=2)
    else:
        raise ValueError(arch)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # default init gives near-uniform logits; widen them so argmax is not a tie
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    return folder


def hf_greedy(folder: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time, never stopping early."""
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            out.append(gen[0, len(p) :].tolist())
    return out


def hf_last_logits(folder: Path, prompt: list[int]) -> np.ndarray:
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, -1].numpy()


@contextlib.contextmanager
def kv_rules_installed():
    """Make the compile pipeline's rule list start with the paged-KV rules (until schedules/rules.py
    lists them itself; dlight's CPU GEMV rule trips over our kernels' data-dependent regions)."""
    import tensorpress.schedules.rules as rules
    from tensorpress.schedules.kv_attention import KVAttentionCPU, kv_attention_rules

    original = rules.rules_for

    def rules_for(target):
        found = original(target)
        if any(isinstance(rule, KVAttentionCPU) for rule in found):
            return found
        return [*kv_attention_rules(), *found]

    rules.rules_for = rules_for
    try:
        yield
    finally:
        rules.rules_for = original


def compile_decoder(folder: Path, artifact: Path, **options) -> Path:
    """tensorpress.compile(folder -> artifact) for the CPU."""
    import tensorpress.compiler.api as api

    with kv_rules_installed():
        api.compile(folder, artifact, target="cpu", **options)
    return artifact
