"""The FPx decode stage in TIR, built for llvm, against the numpy formats: bit for bit, every code."""

from __future__ import annotations

import numpy as np
import pytest
from llvm_harness import UINT, build, run
from tvm import te, tirx

from tensorpress.compiler.formats import WEIGHT_FORMATS, decode_stage, get_weight_format
from tensorpress.compiler.formats import fpx as fpx_format
from tensorpress.compiler.formats import fpx_codes as fpx
from tensorpress.compiler.formats.fpx import FPxFormat
from tensorpress.schedules.weight_gemm import make_weight_gemm

FPX_NAMES = sorted(name for name, fmt in WEIGHT_FORMATS.items() if isinstance(fmt, FPxFormat))


def decode_only(stage, m: int, k: int, dtype: str) -> tirx.PrimFunc:
    """PrimFunc(stored..., W[m, k] dtype): just the stage's decode expression."""
    stored = [te.placeholder(b.shape, b.dtype, name=b.name) for b in stage.stored_buffers(m, k)]
    w = te.compute((m, k), lambda r, c: stage.decode(stored, r, c, dtype), name="decode")
    return te.create_prim_func([*stored, w])


def every_code(m, k, ebits, mbits, seed):
    """uint8 [m, k] holding every code of eXmY: in every row when k >= 2^bits, else across the rows."""
    rng = np.random.default_rng(seed)
    n = 2 ** fpx.code_bits(ebits, mbits)
    row_step = k if n > k else 1
    codes = ((np.arange(m)[:, None] * row_step + np.arange(k)[None, :]) % n).astype(np.uint8)
    assert len(np.unique(codes)) == n
    for row in codes:
        rng.shuffle(row)
    return codes


def awkward_scales(m, seed):
    """fp16 [m]: ordinary scales plus the corners: fp16 subnormals, 0, and scales so large that
    scale * 2^(15 - bias) would overflow fp16 (the reason for the two-step multiply)."""
    rng = np.random.default_rng(seed)
    scales = rng.uniform(1e-3, 10, m).astype(np.float16)
    scales[:6] = [1.0, 2.0**-20, 6e-8, 0.0, 1000.0, 60000.0]
    return scales


@pytest.mark.parametrize("name", FPX_NAMES)
def test_decode_matches_numpy_bit_for_bit_on_every_code(name):
    stage = decode_stage(name)
    fmt = WEIGHT_FORMATS[name]
    m, k = 80, 96  # pads to 128 x 128 in the planes
    codes = every_code(m, k, fmt.ebits, fmt.mbits, seed=len(name))
    scales = awkward_scales(m, seed=3)
    packed = fmt.pack_codes(codes, scales)
    expected = fpx.decode(codes, scales, fmt.ebits, fmt.mbits)
    for dtype in ["float32", "float16"]:
        got = run(build(decode_only(stage, m, k, dtype)), packed.arrays.values(), (m, k), dtype)
        with np.errstate(over="ignore"):
            want = expected.astype(dtype)  # one rounding to fp16, as the kernel's second multiply
        np.testing.assert_array_equal(got.view(UINT[dtype]), want.view(UINT[dtype]), err_msg=f"{name} {dtype}")


@pytest.mark.parametrize("name", sorted(n for n, f in WEIGHT_FORMATS.items() if not f.sparse))  # sized by shape
def test_stage_takes_what_the_registry_packs(name):
    fmt = WEIGHT_FORMATS[name]
    if name == "fp6-auto":
        stage_names = ["e3m2", "e2m3"]  # it stores whichever it picked
    else:
        stage_names = [name]
    for stage_name in stage_names:
        stage = decode_stage(stage_name)
        for m, k in [(64, 128), (48, 80)]:
            packed = fmt.pack(np.random.default_rng(0).standard_normal((m, k)).astype(np.float32))
            assert decode_stage(packed.format).stored_buffers(m, k) == stage.stored_buffers(m, k)
            buffers = stage.stored_buffers(m, k)
            assert [b.name for b in buffers] == list(packed.arrays)
            assert [(b.shape, b.dtype) for b in buffers] == [(a.shape, str(a.dtype)) for a in packed.arrays.values()]
            assert stage.unsupported_reason(m, k) == fmt.unsupported_reason(m, k)
        assert stage.unsupported_reason(40, 64) == fmt.unsupported_reason(40, 64)
        if stage.cpu_panel_width is None:  # the Tensor Core GEMM's multiples of 16; CPU panels pad any M
            assert stage.unsupported_reason(40, 64) is not None


@pytest.mark.parametrize("name", ["fp6", "fp6_e2m3", "fp5", "fp4", "e3m1"])
def test_weight_gemm_matches_numpy(name):
    m, k = 48, 160
    rng = np.random.default_rng(7)
    w = rng.standard_normal((m, k)).astype(np.float32)
    fmt = get_weight_format(name, "mse")
    packed = fmt.pack(w)
    w_hat = fmt.unpack(packed).astype(np.float64)
    stage = decode_stage(name)

    # fp32 activations, symbolic N, bias.
    x = rng.standard_normal((5, k)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    gemm = build(make_weight_gemm(stage, m, k, act_dtype="float32", with_bias=True))
    y = run(gemm, [x, *packed.arrays.values(), bias], (5, m), "float32")
    np.testing.assert_allclose(y, x.astype(np.float64) @ w_hat.T + bias, rtol=1e-5, atol=1e-4)

    # fp16 activations, the row scale in the epilogue (the default): the decoded fp16 values are
    # exact (value * 2^(bias - 15)), the sums fp32, one rounding to fp16 at the end.
    x16 = x[:3].astype(np.float16)
    gemm16 = build(make_weight_gemm(stage, m, k, act_dtype="float16", n=3))
    y16 = run(gemm16, [x16, *packed.arrays.values()], (3, m), "float16")
    want = x16.astype(np.float64) @ w_hat.T
    np.testing.assert_allclose(y16.astype(np.float64), want, rtol=2e-3, atol=1e-3)

    # fp16 activations, scale inside the decode: each weight rounds to fp16 first.
    gemm16 = build(make_weight_gemm(stage, m, k, act_dtype="float16", n=3, row_scale_in_epilogue=False))
    y16 = run(gemm16, [x16, *packed.arrays.values()], (3, m), "float16")
    want = x16.astype(np.float64) @ w_hat.astype(np.float16).astype(np.float64).T
    np.testing.assert_allclose(y16.astype(np.float64), want, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("name", FPX_NAMES)
def test_unscaled_decode_times_row_scale_is_the_decode_bit_for_bit(name):
    # The factored form the GEMM uses (decoded values in the kernel, the row scale in the epilogue),
    # multiplied out in fp32, is numpy's decode exactly, for every code and awkward scales.
    stage = decode_stage(name)
    fmt = WEIGHT_FORMATS[name]
    m, k = 80, 96
    codes = every_code(m, k, fmt.ebits, fmt.mbits, seed=len(name) + 1)
    scales = awkward_scales(m, seed=4)
    packed = fmt.pack_codes(codes, scales)
    stored = [te.placeholder(b.shape, b.dtype, name=b.name) for b in stage.stored_buffers(m, k)]
    w = te.compute(
        (m, k),
        lambda r, c: stage.unscaled_decode(stored, r, c, "float32") * stage.row_scale(stored, r),
        name="factored",
    )
    got = run(build(te.create_prim_func([*stored, w])), packed.arrays.values(), (m, k), "float32")
    expected = fpx.decode(codes, scales, fmt.ebits, fmt.mbits)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_make_weight_gemm_marks_where_the_row_scale_is():
    stage = decode_stage("fp6")
    attr = "tensorpress.row_scale_in_epilogue"
    assert bool(make_weight_gemm(stage, 32, 64).attrs[attr])
    assert not bool(make_weight_gemm(stage, 32, 64, row_scale_in_epilogue=False).attrs[attr])
    assert not bool(make_weight_gemm(decode_stage("dense-fp16"), 32, 64).attrs[attr])


class _FoldedScaleDecode(fpx_format.FPxDecode):
    """A tempting shortcut the stage avoids: one fp16 multiply by scale * 2^(15 - bias)."""

    def decode(self, stored, row, col, dtype):
        *planes, scales = stored
        h = tirx.reinterpret("float16", self.fp16_bits(planes, row, col).astype("uint16"))
        fix = tirx.const(float(2 ** (15 - fpx.exponent_bias(self.ebits))), "float16")
        return (h * (scales[row] * fix)).astype(dtype)


def test_folding_the_scale_into_the_exponent_fix_would_overflow():
    # The test above must catch this: for e2m3, scale 1000 * 2^14 is inf in fp16.
    m, k = 16, 64
    codes = every_code(m, k, 2, 3, seed=0)
    scales = awkward_scales(m, seed=0)
    packed = get_weight_format("e2m3").pack_codes(codes, scales)
    got = run(
        build(decode_only(_FoldedScaleDecode("folded", 2, 3), m, k, "float32")),
        packed.arrays.values(),
        (m, k),
        "float32",
    )
    expected = fpx.decode(codes, scales, 2, 3)
    assert np.isfinite(expected).all() and not np.isfinite(got).all()


@pytest.mark.parametrize("name", ["e3m2", "e2m3", "e2m2", "e3m1", "e2m1", "e4m3", "e1m0", "e1m6"])
def test_fragment_pair_gives_two_fp16_patterns_per_word(name):
    # The SWAR decode each B-fragment lane runs (`fragment_pair`, on the staged planes): W[r, c] and
    # W[r, c + 1] (c even) as one half2, the unscaled values the PrimFunc's decode block gives.
    stage = decode_stage(name)
    fmt = WEIGHT_FORMATS[name]
    m, k = 24, 160
    codes = every_code(m, k, fmt.ebits, fmt.mbits, seed=1)
    packed = fmt.pack_codes(codes, np.ones(m, np.float16))
    stored = {b.name: b for b in stage.stored_buffers(m, k)}
    planes = [te.placeholder(stored[n].shape, stored[n].dtype, name=n) for n in stage.staged_buffers(m, k)]
    pairs = te.compute((m, k // 2), lambda r, c: stage.fragment_pair(planes, r, 2 * c), name="pairs")
    got = run(build(te.create_prim_func([*planes, pairs])), list(packed.arrays.values())[:-1], (m, k // 2), "uint32")
    # numpy: the code's value times 2^(bias - 15), as fp16 (exact), in the low and high halves
    values = fpx.code_values(fmt.ebits, fmt.mbits)[codes] * 2.0 ** (fpx.exponent_bias(fmt.ebits) - 15)
    halves = values.astype(np.float16).view(np.uint16).astype(np.uint32)
    np.testing.assert_array_equal(got, halves[:, 0::2] | (halves[:, 1::2] << np.uint32(16)))
