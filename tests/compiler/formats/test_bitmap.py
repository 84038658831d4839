"""bitmap sparse weights (`compiler/formats/bitmap.py`): pack / unpack against the dense weight and an
element-by-element reading of the stored arrays written here, the TIR decode built for llvm equal to
`unpack` bit for bit, and the weight GEMM on the CPU against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from llvm_harness import UINT, build, run
from tvm import te

from tensorpress.compiler.formats import decode_stage, get_weight_format, sparse_weight_format_names
from tensorpress.errors import TensorpressError
from tensorpress.schedules.weight_gemm import make_weight_gemm


def sparse_weight(m: int, k: int, sparsity: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, k)).astype(np.float32)
    w[rng.random((m, k)) < sparsity] = 0
    return w


def awkward_weight(m: int, k: int, seed: int) -> np.ndarray:
    """Random 50% sparse, plus an all-zero 16 x 64 tile, a tile whose only nonzeros are one row, a
    single nonzero at a tile's last position and one at its first."""
    w = sparse_weight(m, k, 0.5, seed)
    w[16:32, 64:128] = 0  # an all-zero tile
    w[32:48, 0:64] = 0
    w[37, 0:64] = np.arange(1, 65)  # one full row in a tile
    w[0:16, 128:192] = 0
    w[15, 191] = 3.5  # the last position of its tile (word 31, bit 31)
    w[0, 128] = -2.0  # and the first
    return w


def read_element(arrays: dict[str, np.ndarray], row: int, col: int) -> float:
    """W[row, col] read from the stored arrays the way the docstring's picture says, bit by bit."""
    tm, tk, r, c = row // 16, col // 64, row % 16, col % 64
    words = [int(x) for x in arrays["bits"][tm, tk]]
    position = 64 * r + c
    if not (words[position // 32] >> (position % 32)) & 1:
        return 0.0
    before = sum(bin(words[p // 32] >> (p % 32) & 1).count("1") for p in range(position))
    return float(arrays["values"][int(arrays["offsets"][tm, tk]) + before])


def test_registered_as_a_sparse_format():
    assert "bitmap" in sparse_weight_format_names()
    fmt = get_weight_format("bitmap")
    assert fmt.sparse and fmt.code_bits() == 16 and fmt.stored_bytes(64, 128) == 2 * 64 * 128
    with pytest.raises(NotImplementedError, match="depend on its data"):
        decode_stage("bitmap").stored_buffers(64, 128)  # kernels take the packed weight's buffers
    assert fmt.unsupported_reason(64, 128) is None and "16" in fmt.unsupported_reason(40, 64)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(48, 192), (40, 150), (1, 64), (16, 1)])
def test_unpack_is_the_weight_in_fp16(sparsity, shape):
    w = sparse_weight(*shape, sparsity, seed=int(sparsity * 10) + shape[0])
    fmt = get_weight_format("bitmap")
    packed = fmt.pack(w)
    np.testing.assert_array_equal(fmt.unpack(packed), w.astype(np.float16).astype(np.float32))
    nnz = int((w != 0).sum())
    tm, tk = -(-shape[0] // 16), -(-shape[1] // 64)
    assert packed.arrays["bits"].shape == (tm, tk, 32) and packed.arrays["offsets"].shape == (tm, tk)
    values = packed.arrays["values"]
    # two spare values at least (the fragment decode loads rank + 1 of any position)
    assert values.dtype == np.float16 and values.size % 8 == 0 and nnz + 2 <= values.size <= nnz + 9
    assert packed.nbytes == values.size * 2 + tm * tk * (32 * 4 + 4)


def test_stored_arrays_read_element_by_element():
    w = awkward_weight(48, 200, seed=3)
    packed = get_weight_format("bitmap").pack(w)
    want = w.astype(np.float16).astype(np.float32)
    got = np.array([[read_element(packed.arrays, r, c) for c in range(200)] for r in range(48)], np.float32)
    np.testing.assert_array_equal(got, want)
    assert (packed.arrays["bits"][1, 1] == 0).all()  # the all-zero tile stores no bit
    offsets = packed.arrays["offsets"].reshape(-1)
    assert offsets[0] == 0 and (np.diff(offsets) >= 0).all()
    assert packed.arrays["bits"][0, 2, 31] >> 31 == 1 and packed.arrays["bits"][0, 2, 0] & 1 == 1


def test_all_zero_weight_and_fp16_corners():
    fmt = get_weight_format("bitmap")
    packed = fmt.pack(np.zeros((32, 128), np.float32))
    assert packed.arrays["values"].size == 8 and (packed.arrays["bits"] == 0).all()
    np.testing.assert_array_equal(fmt.unpack(packed), np.zeros((32, 128), np.float32))
    w = np.zeros((16, 64), np.float32)
    w[0, :4] = [-0.0, 1e-9, 65504.0, -6e-8]  # -0 and an fp16 underflow keep their set bits
    want = w.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(fmt.unpack(fmt.pack(w)).view(np.uint32), want.view(np.uint32))
    with pytest.raises(TensorpressError, match="inf or NaN"):
        fmt.pack(np.full((16, 16), np.nan, np.float32))
    with pytest.raises(TensorpressError, match="fp16's range"):
        fmt.pack(np.full((16, 16), 1e6, np.float32))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decode_matches_unpack_bit_for_bit(dtype):
    m, k = 48, 200
    w = awkward_weight(m, k, seed=5)
    fmt = get_weight_format("bitmap")
    packed = fmt.pack(w)
    stage = decode_stage("bitmap")
    stored = [te.placeholder(b.shape, b.dtype, name=b.name) for b in packed.buffers]
    decoded = te.compute((m, k), lambda r, c: stage.decode(stored, r, c, dtype), name="decode")
    got = run(build(te.create_prim_func([*stored, decoded])), list(packed.arrays.values()), (m, k), dtype)
    want = fmt.unpack(packed).astype(dtype)
    np.testing.assert_array_equal(got.view(UINT[dtype]), want.view(UINT[dtype]))


def test_weight_gemm_matches_numpy():
    m, k = 48, 160
    rng = np.random.default_rng(7)
    w = sparse_weight(m, k, 0.8, seed=8)
    fmt = get_weight_format("bitmap")
    packed = fmt.pack(w)
    w_hat = w.astype(np.float16).astype(np.float64)
    x = rng.standard_normal((5, k)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    stage = decode_stage("bitmap")
    gemm = build(make_weight_gemm(stage, m, k, act_dtype="float32", with_bias=True, buffers=packed.buffers))
    y = run(gemm, [x, *packed.arrays.values(), bias], (5, m), "float32")
    np.testing.assert_allclose(y, x.astype(np.float64) @ w_hat.T + bias, rtol=1e-5, atol=1e-4)
    x16 = x[:3].astype(np.float16)
    gemm16 = build(make_weight_gemm(stage, m, k, n=3, buffers=packed.buffers))
    y16 = run(gemm16, [x16, *packed.arrays.values()], (3, m), "float16")
    np.testing.assert_allclose(y16.astype(np.float64), x16.astype(np.float64) @ w_hat.T, rtol=2e-3, atol=2e-3)
