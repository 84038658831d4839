"""FPx weights on decoders: Llama / Qwen2 / OPT folders compiled with fp6 for the CPU generate what
transformers generates from the same folder with every compressed linear weight replaced by
decode(encode(W)); the LM head and the embeddings stay dense. The compiler adds no error of its own."""

from __future__ import annotations

import numpy as np
import pytest
from decoder_harness import hf_greedy, hf_last_logits, make_hf_decoder

import tensorpress
from tensorpress.compiler.formats import get_weight_format

NEW_TOKENS = 32
PROMPT_LENGTHS = (5, 17, 1)


def _rounded_copy(folder, layers, dest):
    """The Hugging Face folder again, with each compressed layer's weight through its format's roundtrip."""
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder)
    state = model.state_dict()
    with torch.no_grad():
        for layer in layers:
            if layer["format"].startswith("dense"):
                continue
            fmt = get_weight_format(layer["format"])
            state[layer["weight"]].copy_(torch.from_numpy(fmt.roundtrip(state[layer["weight"]].numpy())))
    model.save_pretrained(dest)
    return dest


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_fp6_decoder_equals_transformers_on_the_rounded_weights(arch, tmp_path):
    folder = make_hf_decoder(arch, tmp_path / arch)
    report = tensorpress.compile(folder, tmp_path / "fp6.tpk", target="cpu", weights="fp6")
    layers = report.manifest["layers"]
    compressed = [layer["weight"] for layer in layers if layer["stored_format"] == "e3m2"]
    dense = [layer["weight"] for layer in layers if layer["weight"] not in compressed]
    assert len(compressed) == len(layers) - 1  # every projection of every block
    assert len(dense) == 1 and ("lm_head" in dense[0] or "embed_tokens" in dense[0])  # OPT ties its head

    reference = _rounded_copy(folder, layers, tmp_path / "rounded")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 384, n).tolist() for n in PROMPT_LENGTHS]
    model = tensorpress.runtime.load(report.artifact)
    assert model.generate(prompts, max_new_tokens=NEW_TOKENS, stop_ids=[]) == hf_greedy(reference, prompts, NEW_TOKENS)
    for prompt, ours in zip(prompts, model.next_token_logits(prompts)):
        np.testing.assert_allclose(ours, hf_last_logits(reference, prompt), rtol=1e-4, atol=1e-4)
