"""A decoder compiled with `KVCacheConfig(int2-kitty / int2-oscar, int8_query=True)` (head_dim 128, GQA 2):
the int8-query scores run inside the whole artifact (prefill, decode, the page quantisation between them).
Against the same model compiled without the option: the first token equals (prefill attends in full
precision), the logits of a decode step over 2-bit pages move, by a few hundredths of their spread at most
(the query's int8 rounding; a random model's greedy tokens, near ties, may then part), and not at all where
no page is 2-bit yet."""

from __future__ import annotations

import numpy as np
import pytest
from decoder_harness import compile_decoder

from tensorpress.compiler.compression_configs import KVCacheConfig
from tensorpress.runtime.decoder import DecoderModel
from tensorpress.runtime.generation_options import check_generation_options
from tensorpress.runtime.loaded_artifact import load_artifact

OPTIONS = {"sink": 16, "window": 32, "page_tokens": 32}


def _llama_head_dim_128(folder):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=128, max_position_embeddings=512, eos_token_id=2,
    )  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """model(fmt, int8): compiled on first use (a compile is ~20 s)."""
    folder = _llama_head_dim_128(tmp_path_factory.mktemp("llama128"))
    built = {}

    def model(fmt, int8):
        if (fmt, int8) not in built:
            path = folder.parent / f"{fmt}-{int8}.tpk"
            calibration = None
            if fmt == "int2-oscar":
                calibration = folder.parent / "calib.npz"
                rng = np.random.default_rng(1)
                np.savez(calibration, input_ids=rng.integers(3, 256, (4, 96)).astype(np.int64))
            compile_decoder(folder, path, kv_cache=KVCacheConfig(fmt, int8_query=int8, **OPTIONS),
                            calibration=calibration)  # fmt: skip
            built[fmt, int8] = DecoderModel(load_artifact(path, "cpu"), max_total_tokens=2048)
        return built[fmt, int8]

    return model


def _decode_logits(model, prompt, token):
    """The logits of one decode step after `prompt`'s prefill (its old pages quantised by then)."""
    request = model._request(0, prompt, check_generation_options(8))
    model._start(request)
    try:
        model._run_prefill([request])
        return model._run_decode([request], [token])
    finally:
        model._finish(request)


@pytest.mark.parametrize("fmt", ["int2-kitty", pytest.param("int2-oscar", marks=pytest.mark.slow)])
def test_int8_query_decoder_follows_the_plain_kernel(models, fmt):
    plain, int8 = models(fmt, False), models(fmt, True)
    prompts = [[int(t) for t in np.random.default_rng(s).integers(3, 256, n)] for s, n in ((0, 150), (1, 90))]
    first = plain.generate(prompts, max_new_tokens=1, stop_ids=[])
    assert int8.generate(prompts, max_new_tokens=1, stop_ids=[]) == first
    for prompt, (token,) in zip(prompts, first):
        exact, rounded = _decode_logits(plain, prompt, token), _decode_logits(int8, prompt, token)
        moved = np.abs(rounded - exact).max()
        assert 0 < moved < 0.05 * (exact.max() - exact.min()), (moved, exact.max() - exact.min())
    short = [[5, 6, 7, 8]]  # nothing in 2-bit pages: the same kernel's fp path, the same logits
    np.testing.assert_array_equal(int8.next_token_logits(short), plain.next_token_logits(short))
