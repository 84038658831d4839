"""The demo decoder (examples/tiny_llama) pruned to 50% and compiled for the CPU with the default
--sparse-format auto (ellpack: the GEMM over the nonzeros, token lanes in prefill, 8-lane decode steps):
its next-token logits and greedy tokens equal transformers' on the same pruned weights (magnitude per
output row, nonzeros rounded to fp16; the LM head and embeddings stay dense and unpruned)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from decoder_harness import compile_decoder, hf_greedy, hf_last_logits

from tensorpress import SparseConfig
from tensorpress.runtime.decoder import DecoderModel
from tensorpress.runtime.loaded_artifact import load_artifact

DEMO = Path(__file__).resolve().parents[2] / "examples" / "tiny_llama"
PROMPT = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114]


def pruned_copy(folder: Path, dest: Path, sparsity: float) -> Path:
    """The model with every decoder-layer linear pruned by torch.topk per output row, in fp16 values."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                w = module.weight
                keep = w.shape[1] - int(np.floor(sparsity * w.shape[1]))
                mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, torch.topk(w.abs(), keep, dim=1).indices, True)
                module.weight.copy_(torch.where(mask, w, 0).to(torch.float16).to(torch.float32))
    model.save_pretrained(dest)
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(folder / extra, dest / extra)
    return dest


@pytest.mark.slow
def test_pruned_demo_decoder_matches_transformers_on_the_same_weights(tmp_path):
    artifact = compile_decoder(DEMO, tmp_path / "sparse.tpk", sparsity=SparseConfig(0.5))
    layers = load_artifact(artifact, "cpu").manifest["layers"]
    kept = [layer for layer in layers if layer["reason"].startswith("skipped")]  # the LM head (tied or by name)
    assert len(kept) == 1 and {layer["format"] for layer in layers if layer not in kept} == {"ellpack"}
    reference = pruned_copy(DEMO, tmp_path / "pruned", 0.5)
    model = DecoderModel(load_artifact(artifact, "cpu"), max_total_tokens=128)
    logits = model.next_token_logits(PROMPT)
    np.testing.assert_allclose(logits.reshape(-1), hf_last_logits(reference, PROMPT), rtol=1e-3, atol=1e-3)
    assert model.generate(PROMPT, max_new_tokens=16, stop_ids=[]) == hf_greedy(reference, [PROMPT], 16)[0]
