"""Test support for decoders: tiny random Hugging Face folders, transformers' answers, compiling."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY = dict(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)


ARCHITECTURES = ("llama", "qwen2", "opt", "llama-tied-rope3", "opt-post-norm")


def hf_config(arch: str):
    """A tiny transformers config (2 layers, hidden 64, 4 heads) of one family, or of a variant:
    llama-tied-rope3: tied embeddings, llama3 RoPE scaling, attention and MLP biases;
    opt-post-norm: OPT-350m's layout (norms after the residual, 32-wide embeddings, project_in/out)."""
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**TINY, intermediate_size=128, num_key_value_heads=2, eos_token_id=2)
    if arch == "qwen2":
        return tf.Qwen2Config(**TINY, intermediate_size=128, num_key_value_heads=2, eos_token_id=2)
    if arch == "opt":
        return tf.OPTConfig(**TINY, ffn_dim=128, word_embed_proj_dim=64, eos_token_id=2)
    if arch == "llama-tied-rope3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        return tf.LlamaConfig(
            **TINY,
            intermediate_size=128,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters=rope,
            eos_token_id=2,
        )
    if arch == "opt-post-norm":
        return tf.OPTConfig(**TINY, ffn_dim=128, word_embed_proj_dim=32, do_layer_norm_before=False, eos_token_id=2)
    raise ValueError(arch)


def make_hf_decoder(arch: str, folder: Path, seed: int = 0) -> Path:
    """Save a random-init model of `hf_config(arch)` into `folder`."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    config = hf_config(arch)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # the default init gives near-uniform logits: widen it so argmax is no tie
                p.normal_(0.0, 0.08)
            else:  # biases and norm weights away from their 0 / 1 init, so using them wrongly shows
                p.add_(torch.randn_like(p) * 0.1)
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


def compile_decoder(folder: Path, artifact: Path, target: str = "cpu", **options) -> Path:
    """tensorpress.compile(folder -> artifact)."""
    import tensorpress

    tensorpress.compile(folder, artifact, target=target, **options)
    return artifact
