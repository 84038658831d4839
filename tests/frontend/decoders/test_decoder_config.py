"""config.json -> DecoderConfig: family knobs, eos ids, and RoPE frequencies equal to transformers' own."""

from __future__ import annotations

import numpy as np
import pytest
import transformers as tf
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tensorpress.errors import ModelImportError
from tensorpress.frontend.decoders.decoder_config import DecoderConfig, decoder_config_from_hf

TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


def _ours(config) -> DecoderConfig:
    return decoder_config_from_hf(config.to_dict())


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ],
)
def test_scaled_rope_frequencies_equal_transformers(rope):
    config = tf.LlamaConfig(**TINY, rope_parameters=rope)
    expected, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
    ours = _ours(config).rope_inv_freq()
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "hf, expected",
    [
        ({}, 64),  # max_position_embeddings
        ({"rope_scaling": {"type": "linear", "factor": 4.0}}, 256),  # e.g. vicuna-16k: 4096 x 4
        # llama 3.1: the config's max_position_embeddings (131072) already exceeds 8192 x 8
        (
            {"max_position_embeddings": 131072, "rope_scaling": {**LLAMA3, "original_max_position_embeddings": 8192}},
            131072,
        ),
        ({"rope_scaling": {**LLAMA3, "original_max_position_embeddings": 32}}, 256),  # 32 x 8 > 64
    ],
)
def test_context_length_is_max_positions_extended_by_rope_scaling(hf, expected):
    config = {**tf.LlamaConfig(**TINY).to_dict(), "rope_parameters": None, **hf}
    assert decoder_config_from_hf(config).context_length() == expected


def test_learned_positions_end_at_their_table():
    assert _ours(tf.OPTConfig(**TINY, ffn_dim=128)).context_length() == 64


def test_default_rope_and_legacy_fields():
    legacy = tf.LlamaConfig(**TINY).to_dict()
    legacy.pop("rope_parameters", None)
    legacy["rope_theta"] = 1234.0
    c = decoder_config_from_hf(legacy)
    assert c.rope_theta == 1234.0 and c.rope_scaling is None
    np.testing.assert_allclose(c.rope_inv_freq(), 1234.0 ** (-np.arange(0, 16, 2) / 16), rtol=1e-6)


def test_family_knobs():
    qwen = _ours(tf.Qwen2Config(**TINY, num_key_value_heads=2, eos_token_id=[5, 7]))
    assert (qwen.family, qwen.qkv_bias, qwen.o_bias, qwen.num_kv_heads, qwen.eos_token_ids) == (
        "llama",
        True,
        False,
        2,
        (5, 7),
    )
    opt = _ours(tf.OPTConfig(**TINY, ffn_dim=128, word_embed_proj_dim=32, do_layer_norm_before=False))
    assert (opt.family, opt.norm, opt.activation, opt.position_encoding) == (
        "opt",
        "layer",
        "relu",
        "learned",
    )
    assert (opt.learned_position_offset, opt.word_embed_proj_dim, opt.norm_before, opt.final_norm) == (
        2,
        32,
        False,
        False,
    )
    assert opt.tie_word_embeddings
    assert DecoderConfig.from_dict(opt.to_dict()) == opt


def test_unsupported_activation_is_named():
    with pytest.raises(ModelImportError, match="gelu_pytorch_tanh"):
        decoder_config_from_hf({**tf.LlamaConfig(**TINY).to_dict(), "hidden_act": "gelu_pytorch_tanh"})
