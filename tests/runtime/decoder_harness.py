"""Test support for decoders: tiny random Hugging Face folders, and compiled models run in-process.

`InProcessArtifact` gives DecoderModel what a loaded .tpk gives it (vm, params, manifest, device
helpers), from an ImportedModel compiled here with `tvm.compile`, so the decoder runtime is tested
on its own as well as through the artifact path.
"""

from __future__ import annotations

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


class InProcessArtifact:
    """An ImportedModel(kind="decoder") compiled for llvm and held in this process."""

    def __init__(self, imported, target: str = "llvm"):
        import tvm
        from tensorpress.schedules.kv_attention import kv_attention_rules
        from tvm import relax
        from tvm.s_tir import dlight as dl

        tvm_target = tvm.target.Target({"kind": target, "num-cores": 2})
        with tvm_target:
            mod = dl.ApplyDefaultSchedule(*kv_attention_rules())(imported.mod)
        executable = tvm.compile(mod, target=tvm_target)
        self.device = tvm.cpu()
        self.vm = relax.VirtualMachine(executable, self.device)
        self.params = [tvm.runtime.tensor(v, self.device) for v in imported.params.values()]
        self.manifest = {"kind": "decoder", "decoder": imported.info["decoder"]}
        self._files = imported.info.get("extra_files", {})

    def to_device(self, array: np.ndarray):
        import tvm

        return tvm.runtime.tensor(np.ascontiguousarray(array), self.device)

    def to_numpy(self, tensor) -> np.ndarray:
        return tensor.numpy()

    def empty(self, shape, dtype: str):
        import tvm

        return tvm.runtime.empty(tuple(shape), dtype, self.device)

    def read_file(self, name: str) -> bytes:
        return Path(self._files[name]).read_bytes()
