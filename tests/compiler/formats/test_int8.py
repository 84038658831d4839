"""int8 weight-only (`compiler/formats/int8.py`): the packer against torchao's recipe written in torch,
and the TIR decode stage, built for llvm, against the numpy reference, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llvm_harness import UINT, build, run
from tvm import te

from tensorpress.compiler.formats import decode_stage, get_weight_format
from tensorpress.compiler.formats.int8 import Int8WeightFormat
from tensorpress.errors import TensorpressError
from tensorpress.schedules.weight_gemm import make_weight_gemm


def torchao_int8_weight_only(w: np.ndarray, scale_dtype=torch.float16) -> tuple[np.ndarray, np.ndarray]:
    """torchao's int8_weight_only quantisation (symmetric, per output channel, codes in [-128, 127]):
    scale = absmax / ((127 - -128) / 2), codes = clamp(round(w / scale)), with the scale kept in
    `scale_dtype` before the codes are chosen (as this format stores it). Where torchao clamps a tiny
    scale to the dtype's eps, this format keeps fp16's smallest subnormal (documented in int8.py)."""
    t = torch.from_numpy(w).to(torch.float64)
    ideal = t.abs().amax(dim=1) / 127.5
    scale = ideal.to(scale_dtype).to(torch.float64)
    scale = torch.where((ideal > 0) & (scale == 0), torch.tensor(2.0**-24, dtype=torch.float64), scale)
    codes = torch.clamp(torch.round(t / scale[:, None]), -128, 127).to(torch.int8)
    return codes.numpy(), scale.to(scale_dtype).numpy()


def awkward_weight(m: int, k: int, seed: int) -> np.ndarray:
    """Ordinary rows plus the corners: a zero row, a row whose scale underflows fp16, a huge row, rows
    with exact ties (w / scale = x.5), a row of one sign."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, k)).astype(np.float32)
    w[0] = 0
    w[1] *= 1e-12
    w[2] *= 1e4
    w[3] = np.linspace(-127.5, 127.5, k).astype(np.float32)  # scale 1: halves round to even
    w[4] = np.abs(w[4])
    return w


def test_pack_is_torchaos_recipe():
    w = awkward_weight(40, 96, seed=1)
    packed = get_weight_format("int8").pack(w)
    codes, scales = torchao_int8_weight_only(w)
    np.testing.assert_array_equal(packed.arrays["scales"], scales)
    np.testing.assert_array_equal(packed.arrays["codes"], codes)
    assert packed.format == "int8" and list(packed.arrays) == ["codes", "scales"]
    assert packed.arrays["codes"].dtype == np.int8 and packed.arrays["scales"].dtype == np.float16
    assert packed.nbytes == Int8WeightFormat().stored_bytes(40, 96) == 40 * 96 + 2 * 40
    assert packed.arrays["codes"][3, 0] == -128 and packed.arrays["codes"][3, -1] == 127  # clamped ends


def test_unpack_is_code_times_scale_and_within_half_a_step():
    w = awkward_weight(40, 96, seed=2)
    fmt = get_weight_format("int8")
    packed = fmt.pack(w)
    codes, scales = packed.arrays["codes"], packed.arrays["scales"]
    w_hat = fmt.unpack(packed)
    np.testing.assert_array_equal(
        w_hat, (codes.astype(np.float64) * scales.astype(np.float64)[:, None]).astype(np.float32)
    )
    step = scales.astype(np.float64)[:, None]
    error = np.abs(w_hat.astype(np.float64) - w)
    inside = np.abs(w) <= 127 * step  # the code range reaches: half a step at most
    assert (error[inside] <= (step / 2 + 1e-6 * np.abs(w))[inside]).all()
    assert (error <= step + 1e-6 * np.abs(w)).all()  # the rest clamps to +-127 / -128 (fp16-rounded scale)
    assert (w_hat[0] == 0).all()


def test_refuses_non_finite_weights():
    w = np.ones((16, 16), np.float32)
    w[3, 4] = np.nan
    with pytest.raises(TensorpressError, match="inf or NaN"):
        get_weight_format("int8").pack(w)


def every_code(m: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = ((np.arange(m)[:, None] * k + np.arange(k)[None, :]) % 256 - 128).astype(np.int8)
    for row in codes:
        rng.shuffle(row)
    return codes


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decode_matches_numpy_bit_for_bit_on_every_code(dtype):
    m, k = 48, 256
    codes = every_code(m, k, seed=3)
    scales = np.random.default_rng(4).uniform(1e-3, 10, m).astype(np.float16)
    scales[:4] = [0.0, 6e-8, 2.0**-20, 60000.0]
    stage = decode_stage("int8")
    stored = [te.placeholder(b.shape, b.dtype, name=b.name) for b in stage.stored_buffers(m, k)]
    w = te.compute((m, k), lambda r, c: stage.decode(stored, r, c, dtype), name="decode")
    got = run(build(te.create_prim_func([*stored, w])), [codes, scales], (m, k), dtype)
    expected = (codes.astype(np.float64) * scales.astype(np.float64)[:, None]).astype(np.float32)
    with np.errstate(over="ignore"):
        want = expected.astype(dtype)
    np.testing.assert_array_equal(got.view(UINT[dtype]), want.view(UINT[dtype]))
    # the factored form (codes in the kernel, the scale in the epilogue) multiplies out to the same
    w = te.compute(
        (m, k), lambda r, c: stage.unscaled_decode(stored, r, c, "float32") * stage.row_scale(stored, r), name="w"
    )
    got = run(build(te.create_prim_func([*stored, w])), [codes, scales], (m, k), "float32")
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_weight_gemm_matches_numpy():
    m, k = 48, 160
    rng = np.random.default_rng(7)
    w = rng.standard_normal((m, k)).astype(np.float32)
    fmt = get_weight_format("int8")
    packed = fmt.pack(w)
    w_hat = fmt.unpack(packed).astype(np.float64)
    x = rng.standard_normal((5, k)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    gemm = build(make_weight_gemm(decode_stage("int8"), m, k, act_dtype="float32", with_bias=True))
    y = run(gemm, [x, *packed.arrays.values(), bias], (5, m), "float32")
    np.testing.assert_allclose(y, x.astype(np.float64) @ w_hat.T + bias, rtol=1e-5, atol=1e-4)
    x16 = x[:3].astype(np.float16)
    y16 = run(
        build(make_weight_gemm(decode_stage("int8"), m, k, n=3)), [x16, *packed.arrays.values()], (3, m), "float16"
    )
    np.testing.assert_allclose(y16.astype(np.float64), x16.astype(np.float64) @ w_hat.T, rtol=2e-3, atol=2e-3)
