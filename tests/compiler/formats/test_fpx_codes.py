"""The eXmY value sets and the quantiser, against references built from the definition (fractions)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tensorpress.compiler.formats import fpx_codes as fpx
from tensorpress.errors import ConfigError, TensorpressError

ALL_FORMATS = [(e, m) for e in range(1, 5) for m in range(8 - e)]
NAMED_FORMATS = [(3, 2), (2, 3), (2, 2), (3, 1), (2, 1)]


def definition_value(code: int, ebits: int, mbits: int) -> Fraction:
    """The value of `code` read straight from the definition of eXmY (sign, exponent, mantissa)."""
    sign = (code >> (ebits + mbits)) & 1
    e = (code >> mbits) & ((1 << ebits) - 1)
    m = code & ((1 << mbits) - 1)
    bias = 2 ** (ebits - 1) - 1
    if e == 0:
        magnitude = Fraction(2) ** (1 - bias) * Fraction(m, 2**mbits)
    else:
        magnitude = Fraction(2) ** (e - bias) * (1 + Fraction(m, 2**mbits))
    return -magnitude if sign else magnitude


def all_codes(ebits: int, mbits: int) -> np.ndarray:
    return np.arange(2 ** (1 + ebits + mbits), dtype=np.uint8)


@pytest.mark.parametrize("ebits,mbits", ALL_FORMATS)
def test_every_code_decodes_to_its_definition(ebits, mbits):
    codes = all_codes(ebits, mbits)
    scales = np.array([1.0, 0.375, 2.0**-20, 3.0e4], dtype=np.float16)
    got = fpx.decode(np.tile(codes, (len(scales), 1)), scales, ebits, mbits)
    assert got.dtype == np.float32
    sign_bit = 1 << (ebits + mbits)
    for row, scale in enumerate(scales):
        for code in codes:
            expected = definition_value(int(code), ebits, mbits) * Fraction(float(scale))
            assert Fraction(float(got[row, code])) == expected, (ebits, mbits, int(code), float(scale))
            assert np.signbit(got[row, code]) == bool(code & sign_bit)  # -0 keeps its sign


def test_named_formats_have_the_documented_ranges():
    assert fpx.max_value(3, 2) == 28.0
    assert fpx.max_value(2, 3) == 7.5
    assert fpx.max_value(2, 2) == 7.0
    assert fpx.max_value(3, 1) == 24.0
    assert fpx.max_value(2, 1) == 6.0
    # e2m1 is the OCP MX FP4 (E2M1) value set.
    assert fpx.magnitudes(2, 1).tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


@pytest.mark.parametrize("ebits,mbits", ALL_FORMATS)
def test_encode_of_decoded_codes_gives_the_codes_back(ebits, mbits):
    rng = np.random.default_rng(ebits * 8 + mbits)
    codes = np.tile(all_codes(ebits, mbits), (5, 2))
    for row in codes:
        rng.shuffle(row)
    scales = np.array([1.0, 0.01, 7.25, 1e-6, 5e3], dtype=np.float16)
    values = fpx.decode(codes, scales, ebits, mbits)
    # Every row holds the largest code, so the absmax scale is exactly the scale decoded with.
    got_codes, got_scales = fpx.encode(values, ebits, mbits)
    np.testing.assert_array_equal(got_scales, scales)
    np.testing.assert_array_equal(got_codes, codes)


@pytest.mark.parametrize("ebits,mbits", ALL_FORMATS)
def test_ties_go_to_the_even_code(ebits, mbits):
    mags = [abs(definition_value(c, ebits, mbits)) for c in range(2 ** (ebits + mbits))]
    scale = Fraction(float(np.float16(0.8125)))
    midpoints = [(a + b) / 2 * scale for a, b in zip(mags, mags[1:])]
    w = np.array([[float(t) for t in midpoints] + [-float(t) for t in midpoints]], dtype=np.float32)
    assert all(Fraction(float(v)) == t for v, t in zip(w[0], midpoints))  # the ties are exact in fp32
    codes = fpx.quantize(w, np.array([scale], dtype=np.float16), ebits, mbits)
    lower = np.arange(len(midpoints))
    even = np.where(lower % 2 == 0, lower, lower + 1)
    sign = 1 << (ebits + mbits)
    np.testing.assert_array_equal(codes[0], np.concatenate([even, even | sign]).astype(np.uint8))


@pytest.mark.parametrize("ebits,mbits", NAMED_FORMATS)
def test_out_of_range_saturates(ebits, mbits):
    top = 2 ** (ebits + mbits) - 1
    sign = 1 << (ebits + mbits)
    scale = np.array([0.5], dtype=np.float16)
    big = fpx.max_value(ebits, mbits) * 0.5 * np.array([1.0001, 1.5, 1e3, 1e30])
    w = np.concatenate([big, -big])[None, :].astype(np.float32)
    codes = fpx.quantize(w, scale, ebits, mbits)
    np.testing.assert_array_equal(codes[0], [top] * 4 + [top | sign] * 4)


def test_weights_beyond_a_rounded_down_scale_saturate():
    # absmax / 28 = 1.000244 rounds down to the fp16 1.0, so absmax / scale16 > 28.
    w = np.array([[28.0 * 1.000244, -3.0, 0.5]], dtype=np.float32)
    codes, scales = fpx.encode(w, 3, 2)
    assert scales[0] == np.float16(1.0)
    assert codes[0, 0] == 31  # largest magnitude, positive
    assert fpx.decode(codes, scales, 3, 2)[0, 0] == 28.0


def test_all_zero_and_extreme_rows():
    w = np.zeros((4, 6), dtype=np.float32)
    w[1] = -0.0
    w[2] = [1e-30, -3e-30, 0, 0, 0, 0]  # absmax / max underflows fp16: smallest subnormal scale
    w[3] = [1e9, -2e9, 1.0, 0, 0, 0]  # absmax / max overflows fp16: largest finite scale, saturate
    codes, scales = fpx.encode(w, 3, 2)
    out = fpx.decode(codes, scales, 3, 2)
    assert scales[0] == 0 and scales[1] == 0
    np.testing.assert_array_equal(out[:2], w[:2])
    assert np.signbit(out[1]).all() and not np.signbit(out[0]).any()
    assert scales[2] == np.finfo(np.float16).smallest_subnormal
    np.testing.assert_array_equal(out[2], 0.0)  # far below half the smallest step
    assert scales[3] == np.finfo(np.float16).max
    assert out[3, 0] == 28.0 * 65504.0 and out[3, 1] == -28.0 * 65504.0


def test_rejects_bad_formats_and_weights():
    for ebits, mbits in [(0, 3), (5, 1), (3, -1), (4, 4), (2, 6)]:
        with pytest.raises(ConfigError):
            fpx.encode(np.ones((2, 2), np.float32), ebits, mbits)
    with pytest.raises(TensorpressError):
        fpx.encode(np.array([[1.0, np.nan]], np.float32), 3, 2)
    with pytest.raises(TensorpressError):
        fpx.encode(np.ones(4, np.float32), 3, 2)
    with pytest.raises(TensorpressError):
        fpx.decode(np.full((1, 2), 64, np.uint8), np.ones(1, np.float16), 3, 2)  # 7-bit code in e3m2
    with pytest.raises(TensorpressError):
        fpx.decode(np.zeros((2, 2), np.uint8), np.ones(2, np.float32), 3, 2)  # scales must be fp16


def brute_force_nearest(w: np.ndarray, scale: float, ebits: int, mbits: int) -> tuple[list[int], list[bool]]:
    """Per weight: the magnitude code nearest (exactly) to |w| / scale, and whether it was a tie."""
    mags = [abs(definition_value(c, ebits, mbits)) for c in range(2 ** (ebits + mbits))]
    s = Fraction(scale)
    best, ties = [], []
    for x in w:
        target = abs(Fraction(float(x)))
        dist = [abs(target - v * s) for v in mags]
        d = min(dist)
        hits = [c for c, di in enumerate(dist) if di == d]
        best.append(hits[0] if len(hits) == 1 else next(c for c in hits if c % 2 == 0))
        ties.append(len(hits) > 1)
    return best, ties


weights = hnp.arrays(
    np.float32,
    st.tuples(st.integers(1, 3), st.integers(1, 8)),
    elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=True),
)


@settings(max_examples=60, deadline=None)
@given(w=weights, fmt=st.sampled_from(NAMED_FORMATS), row_gain=st.sampled_from([1.0, 1e-3, 37.0]))
def test_fuzzed_weights_round_to_the_nearest_representable(w, fmt, row_gain):
    ebits, mbits = fmt
    w = (w * np.float32(row_gain)).astype(np.float32)
    codes, scales = fpx.encode(w, ebits, mbits)
    mag_mask = (1 << (ebits + mbits)) - 1
    for row in range(w.shape[0]):
        expected, _ = brute_force_nearest(w[row], float(scales[row]), ebits, mbits)
        np.testing.assert_array_equal(codes[row] & mag_mask, expected)
        np.testing.assert_array_equal(codes[row] >> (ebits + mbits), np.signbit(w[row]))
    ideal = np.abs(w).max(axis=1).astype(np.float64) / fpx.max_value(ebits, mbits)
    expected = ideal.astype(np.float16)
    expected[(ideal > 0) & (expected == 0)] = np.finfo(np.float16).smallest_subnormal  # no zero scale
    np.testing.assert_array_equal(scales, expected)


def test_mse_scale_search_never_loses_to_absmax_and_wins_on_gaussians():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 256)).astype(np.float32)
    for ebits, mbits in NAMED_FORMATS:
        codes, scales = fpx.encode(w, ebits, mbits)
        mse_codes, mse_scales = fpx.encode_mse(w, ebits, mbits)
        base = fpx.reconstruction_error(w, codes, scales, ebits, mbits)
        searched = fpx.reconstruction_error(w, mse_codes, mse_scales, ebits, mbits)
        assert (searched <= base).all()
        assert searched.sum() < 0.97 * base.sum(), (ebits, mbits)
        # The searched codes are still the nearest codes for the searched scales.
        np.testing.assert_array_equal(mse_codes, fpx.quantize(w, mse_scales, ebits, mbits))
