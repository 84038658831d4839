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


def export_onnx_decoder(folder: Path, dest: Path) -> Path:
    """The Hugging Face model in `folder` exported with torch.onnx (TorchScript) the way optimum lays a
    cached decoder out: inputs input_ids, attention_mask, position_ids, past_key_values.{i}.key/value
    [batch, kv heads, past, head dim]; outputs logits, present.{i}.key/value. `dest` gets model.onnx
    and the config files only (no safetensors: the weights must come from the graph)."""
    import shutil

    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder).eval()
    cfg = model.config
    layers = cfg.num_hidden_layers
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    class WithCache(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.m = inner

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = tf.DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if (folder / name).is_file():
            shutil.copy(folder / name, dest / name)
    past_len, new = 2, 3
    past = [torch.randn(1, kv_heads, past_len, head_dim) for _ in range(2 * layers)]
    kv_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"}}
    dynamic["position_ids"] = {0: "batch", 1: "seq"}
    dynamic.update({name: {0: "batch", 2: "past"} for name in kv_names})
    dynamic.update({name.replace("past_key_values", "present"): {0: "batch", 2: "total"} for name in kv_names})
    args = (
        torch.randint(3, cfg.vocab_size, (1, new)),
        torch.ones(1, past_len + new, dtype=torch.int64),
        torch.arange(past_len, past_len + new)[None],
        *past,
    )
    path = dest / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(
            WithCache(model),
            args,
            str(path),
            input_names=["input_ids", "attention_mask", "position_ids", *kv_names],
            output_names=["logits", *(n.replace("past_key_values", "present") for n in kv_names)],
            dynamic_axes=dynamic,
            dynamo=False,
            opset_version=17,
        )
    return path


def onnxruntime_greedy(path: Path, prompt: list[int], max_new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy decoding of a cached ONNX decoder with onnxruntime, feeding `present` back as the past:
    (new tokens, logits after the prompt)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path))
    kv_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    feeds = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in kv_inputs}
    ids, past_len, out, first = list(prompt), 0, [], None
    for _ in range(max_new_tokens):
        step = ids if past_len == 0 else ids[-1:]
        feeds["input_ids"] = np.array([step], np.int64)
        feeds["attention_mask"] = np.ones((1, past_len + len(step)), np.int64)
        feeds["position_ids"] = np.arange(past_len, past_len + len(step), dtype=np.int64)[None]
        logits, *present = session.run(None, feeds)
        first = logits[0, -1] if first is None else first
        for i, value in zip(kv_inputs, present):
            feeds[i.name] = value
        past_len += len(step)
        ids.append(int(logits[0, -1].argmax()))
        out.append(ids[-1])
    return out, first
