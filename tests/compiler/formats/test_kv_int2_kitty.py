"""The int2-kitty page format's numpy reference (`compiler/formats/kv_int2_kitty.py`): packing, the boosted
channels, the error bounds, the bits per element, and the synthetic quality test of the issue: on keys with
outlier channels and a sink token, the attention probabilities' KL divergence from full precision orders
int2 per-token (naive) > KIVI-style per-channel without boost > int2-kitty, for several seeds. The two
baselines are written here, independently of the format's code."""

from __future__ import annotations

import numpy as np
import pytest

from tensorpress.compiler.formats import kv_cache_format_names
from tensorpress.compiler.formats.kv_int2_kitty import (
    bits_per_element,
    dequantize_page,
    key_codes,
    pack_2bit,
    quantize_page,
    unpack_2bit,
)
from tensorpress.errors import ConfigError

PS, D = 128, 128


def test_it_is_offered_as_a_kv_cache_dtype():
    assert "int2-kitty" in kv_cache_format_names()


def test_two_bit_packing_puts_element_4j_plus_i_in_bits_2i():
    codes = np.array([[1, 2, 3, 0, 3, 3, 3, 3]])
    packed = pack_2bit(codes)
    assert packed.dtype == np.uint8 and list(packed[0]) == [0b00111001, 0xFF]
    np.testing.assert_array_equal(unpack_2bit(packed), codes)


def _plain_asymmetric(x, bits, axis):
    """Asymmetric quantisation written out in float64 (min and scale rounded to fp16 as the format does)."""
    x = x.astype(np.float64)
    levels = 2**bits - 1
    low = np.float16(x.min(axis=axis, keepdims=True)).astype(np.float64)
    scale = np.float16(np.maximum(x.max(axis=axis, keepdims=True) - low, 0) / levels).astype(np.float64)
    safe = np.where(scale > 0, scale, 1)
    return low + np.where(scale > 0, np.clip(np.round((x - low) / safe), 0, levels), 0) * scale


def test_boosted_channels_are_the_largest_mean_abs_and_get_4_bits():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((PS, D)).astype(np.float32)
    strong = [3, 17, 64, 100]
    keys[:, strong] *= 20
    page = quantize_page(keys, keys, boost_fraction=0.125)  # 16 channels
    assert len(page.k_index) == 16 and set(strong) <= set(page.k_index.tolist())
    assert list(page.k_index) == sorted(page.k_index)
    expected = np.argsort(-np.abs(keys).mean(0), kind="stable")[:16]
    assert set(page.k_index.tolist()) == set(expected.tolist())
    codes = key_codes(page)
    boosted = np.zeros(D, bool)
    boosted[page.k_index] = True
    assert codes[:, boosted].max() == 15 and codes[:, ~boosted].max() == 3
    # uniform dequantisation equals plain per-channel 4-bit on boosted channels and 2-bit on the others
    k_hat, _ = dequantize_page(page)
    np.testing.assert_allclose(k_hat[:, boosted], _plain_asymmetric(keys, 4, 0)[:, boosted], rtol=0, atol=1e-4)
    np.testing.assert_allclose(k_hat[:, ~boosted], _plain_asymmetric(keys, 2, 0)[:, ~boosted], rtol=0, atol=1e-4)


@pytest.mark.parametrize("fraction", [0.0, 0.125, 0.25])
def test_round_trip_stays_within_half_a_step(fraction):
    rng = np.random.default_rng(1)
    keys = (rng.standard_normal((PS, D)) * rng.uniform(0.1, 10, D)).astype(np.float32)
    values = (rng.standard_normal((PS, D)) * rng.uniform(0.1, 10, (PS, 1))).astype(np.float32)
    page = quantize_page(keys, values, fraction)
    k_hat, v_hat = dequantize_page(page)
    k_step = page.k_min_scale[:, 1].astype(np.float64)
    v_step = page.v_min_scale[:, 1].astype(np.float64)
    # half a step, plus what fp16 rounding of min and scale costs (at most 2^-10 of the range)
    k_range = keys.max(0) - keys.min(0)
    v_range = values.max(1) - values.min(1)
    assert (np.abs(k_hat - keys) <= (k_step / 2 + k_range * 2**-10)[None, :]).all()
    assert (np.abs(v_hat - values) <= (v_step / 2 + v_range * 2**-10)[:, None]).all()
    np.testing.assert_allclose(v_hat, _plain_asymmetric(values, 2, 1), rtol=0, atol=1e-4)


def test_bits_per_element_and_stored_bytes():
    rng = np.random.default_rng(2)
    page = quantize_page(*(rng.standard_normal((2, PS, D)).astype(np.float32)), boost_fraction=0.25)
    assert page.nbytes() == (PS * D // 4 + PS * 32 // 4 + 32 + 4 * D) + (PS * D // 4 + 4 * PS)
    # the cache keeps a slot per channel (D bytes) where the page keeps the B boosted indices
    assert 8 * (page.nbytes() - 32 + D) / (2 * PS * D) == bits_per_element(D, PS, 0.25)
    assert bits_per_element(128, 128, 0.25) <= 2.6  # the budget at f = 0.25, metadata included
    assert bits_per_element(128, 128, 0.0) < bits_per_element(128, 128, 0.125) < bits_per_element(128, 128, 0.25)
    with pytest.raises(ConfigError, match="multiple of 4 channels"):
        quantize_page(np.zeros((PS, D), np.float32), np.zeros((PS, D), np.float32), boost_fraction=0.1)


# ------------------------------------------------------------------ the synthetic quality test


def synthetic_keys(seed: int, tokens: int = 4 * PS, sink: int = 1):
    """Keys [T, D] with outlier channels (a few channels with a large per-channel offset and spread, as
    in LLM keys) and `sink` leading tokens of large norm, plus queries [Q, D] that attend to the sink."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((tokens, D))
    outliers = rng.choice(D, size=8, replace=False)
    keys[:, outliers] = keys[:, outliers] * rng.uniform(4, 10, 8) + rng.uniform(-15, 15, 8)
    keys[:sink] = rng.standard_normal((sink, D)) * 6
    queries = rng.standard_normal((64, D))
    queries += 0.15 * keys[0] / np.linalg.norm(keys[0]) * np.sqrt(D)  # the sink draws attention
    return keys.astype(np.float32), queries


def attention_kl(keys, keys_hat, queries) -> float:
    """Mean over queries of KL(softmax(q·K/√D) || softmax(q·K̂/√D))."""

    def log_softmax(k):
        s = queries @ k.astype(np.float64).T / np.sqrt(D)
        s -= s.max(axis=1, keepdims=True)
        return s - np.log(np.exp(s).sum(axis=1, keepdims=True))

    lp, lq = log_softmax(keys), log_softmax(keys_hat)
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())


def per_token_int2(keys):
    return _plain_asymmetric(keys, 2, axis=1)


def per_channel_int2_pages(keys):
    """KIVI-style: per channel over each page of PS tokens, 2 bits, no boost."""
    return np.concatenate([_plain_asymmetric(keys[i : i + PS], 2, axis=0) for i in range(0, len(keys), PS)])


def kitty(keys, fraction=0.25):
    pages = [quantize_page(keys[i : i + PS], keys[i : i + PS], fraction) for i in range(0, len(keys), PS)]
    return np.concatenate([dequantize_page(p)[0] for p in pages])


@pytest.mark.parametrize("seed", range(5))
def test_kl_order_naive_per_token_worse_than_per_channel_worse_than_kitty(seed):
    """The sink (token 0) stays full precision in every method, as Kitty keeps it; the rest of the keys
    are quantised by each method over pages of 128 tokens."""
    keys, queries = synthetic_keys(seed)
    sink = 1
    kl = {}
    for name, method in (("per_token", per_token_int2), ("per_channel", per_channel_int2_pages), ("kitty", kitty)):
        quantised = keys.copy()
        quantised[sink:] = method(keys[sink:])
        kl[name] = attention_kl(keys, quantised, queries)
    assert kl["per_token"] > kl["per_channel"] > kl["kitty"] > 0, kl
    # without the boost the page quantiser is exactly the per-channel baseline
    np.testing.assert_allclose(kitty(keys[sink:], 0.0), per_channel_int2_pages(keys[sink:]), rtol=0, atol=1e-5)
