"""The int2-oscar page format's numpy reference (`compiler/formats/kv_int2_oscar.py`): the percentile clip
against numpy's own percentile, the per-token 2-bit grid and its packing, and the synthetic quality test of
the issue on kitty's synthetic keys (outlier channels, a sink token; the same generator, not retuned):
attention-probability KL orders int2 per-token (naive) > Hadamard-only rotation > KIVI-style per-channel
> int2-kitty, and int2-oscar (rotation calibrated on held-out queries, clipped per token) < Hadamard-only.
The baselines are written here or in test_kv_int2_kitty.py, independently of the format's code."""

from __future__ import annotations

import numpy as np
import pytest
from test_kv_int2_kitty import (
    D,
    _plain_asymmetric,
    attention_kl,
    kitty,
    per_channel_int2_pages,
    per_token_int2,
    synthetic_keys,
)

from tensorpress.compiler.calibration.kv_rotations import hadamard, rotation_from_covariance
from tensorpress.compiler.formats import get_kv_cache_format, kv_cache_format_names
from tensorpress.compiler.formats.kv_int2_kitty import unpack_2bit
from tensorpress.compiler.formats.kv_int2_oscar import clip_rank, clipped_range, dequantize_rows, quantize_rows


def test_it_is_offered_as_a_kv_cache_dtype():
    assert "int2-oscar" in kv_cache_format_names()


@pytest.mark.parametrize("head_dim, fraction", [(128, 0.96), (128, 0.92), (64, 0.96), (32, 0.92), (16, 0.96)])
def test_the_clip_range_is_numpys_lower_and_higher_percentile(head_dim, fraction):
    rng = np.random.default_rng(head_dim)
    rows = (rng.standard_normal((50, head_dim)) * rng.uniform(0.5, 8, (50, 1))).astype(np.float32)
    rows[3, ::3] = rows[3, 0]  # ties
    lo, hi = clipped_range(rows, fraction)
    np.testing.assert_array_equal(hi, np.percentile(rows, 100 * fraction, axis=1, method="lower"))
    np.testing.assert_array_equal(lo, np.percentile(rows, 100 * (1 - fraction), axis=1, method="higher"))
    assert (rows > hi[:, None]).sum(axis=1).max() <= head_dim - 1 - clip_rank(head_dim, fraction)


def test_per_token_codes_are_the_plain_2bit_grid_of_the_clipped_range():
    rng = np.random.default_rng(3)
    rows = (rng.standard_normal((64, 128)) * rng.uniform(0.1, 10, (64, 1))).astype(np.float32)
    rows[:, 7] *= 30  # an outlier channel: clipped, not stretching the grid
    codes, min_scale = quantize_rows(rows, 0.96)
    assert codes.dtype == np.uint8 and codes.max() == 3 and min_scale.dtype == np.float16
    lo, hi = (np.percentile(rows.astype(np.float64), q, axis=1, method=m) for q, m in ((4, "higher"), (96, "lower")))
    low = np.float16(lo).astype(np.float64)
    scale = np.float16((hi - low) / 3).astype(np.float64)
    expected = np.clip(np.round((rows - low[:, None]) / scale[:, None]), 0, 3)
    np.testing.assert_array_equal(codes, expected)
    x_hat = dequantize_rows(codes, min_scale)
    inside = (rows >= lo[:, None]) & (rows <= hi[:, None])
    step = scale[:, None] * np.ones_like(rows)
    assert (np.abs(x_hat - rows)[inside] <= step[inside] / 2 + 1e-3 * step[inside]).all()
    assert (codes[rows > hi[:, None]] == 3).all() and (codes[rows < lo[:, None]] == 0).all()


def test_a_page_packs_four_codes_a_byte_and_round_trips():
    fmt = get_kv_cache_format("int2-oscar")
    rng = np.random.default_rng(4)
    keys, values = rng.standard_normal((2, 16, 32)).astype(np.float32)
    codes, min_scale = fmt.quantize_page(keys, values)  # type: ignore[attr-defined]
    assert codes.shape == (2, 16, 8) and min_scale.shape == (2, 16, 2)
    np.testing.assert_array_equal(unpack_2bit(codes[0]), quantize_rows(keys, 0.96)[0])
    np.testing.assert_array_equal(unpack_2bit(codes[1]), quantize_rows(values, 0.92)[0])
    k_hat, v_hat = fmt.dequantize_page((codes, min_scale), "float32")  # type: ignore[attr-defined]
    np.testing.assert_array_equal(v_hat, dequantize_rows(*quantize_rows(values, 0.92)))
    assert np.abs(k_hat - keys).mean() < 0.5


def test_the_rotation_is_orthonormal_and_diagonalises_the_covariance_before_the_hadamard():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64))
    covariance = x.T @ x
    rotation = rotation_from_covariance(covariance)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(64), atol=1e-10)
    h = hadamard(64)
    np.testing.assert_allclose(h @ h, np.eye(64), atol=1e-12)  # symmetric and orthonormal
    basis = h.T @ rotation  # Uᵀ: the eigenvectors, largest eigenvalue first
    inner = basis @ covariance @ basis.T
    np.testing.assert_allclose(inner - np.diag(np.diag(inner)), 0, atol=1e-6 * np.abs(inner).max())
    assert (np.diff(np.diag(inner)) <= 1e-9 * inner[0, 0]).all()


def _rotated(keys, rotation, clip):
    """Keys quantised per token in the basis `rotation` (rows R k), with the format's clip or plain 2-bit."""
    rotated = keys.astype(np.float64) @ rotation.T
    if clip is None:
        return _plain_asymmetric(rotated, 2, axis=1) @ rotation
    return dequantize_rows(*quantize_rows(rotated, clip)).astype(np.float64) @ rotation


@pytest.mark.parametrize("seed", range(5))
def test_kl_order_naive_hadamard_kivi_kitty_and_oscar_below_hadamard(seed):
    """As kitty's test: the sink stays full precision. OSCAR's R_K is calibrated on 256 queries drawn
    independently from the test queries' distribution (kitty's generator: N(0, I) plus the pull to the
    sink)."""
    keys, queries = synthetic_keys(seed)
    rng = np.random.default_rng(1000 + seed)
    held_out = rng.standard_normal((256, D)) + 0.15 * keys[0] / np.linalg.norm(keys[0]) * np.sqrt(D)
    r_k = rotation_from_covariance(held_out.T @ held_out)
    methods = {
        "per_token": per_token_int2,
        "hadamard": lambda k: _rotated(k, hadamard(D), None),
        "per_channel": per_channel_int2_pages,
        "kitty": kitty,
        "oscar": lambda k: _rotated(k, r_k, 0.96),
    }
    kl = {}
    for name, method in methods.items():
        quantised = keys.copy()
        quantised[1:] = method(keys[1:])
        kl[name] = attention_kl(keys, quantised, queries)
    assert kl["per_token"] > kl["hadamard"] > kl["per_channel"] > kl["kitty"] > 0, kl
    assert kl["oscar"] < kl["hadamard"], kl
