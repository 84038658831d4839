"""bitmap x FPx sparse weights (`compiler/formats/bitmap_fpx.py`): pack / unpack against FPx's own
quantiser (hypothesis-fuzzed densities, odd shapes, several eXmY), the stored arrays read element by
element as the docstring's picture says, the bytes, the TIR decode built for llvm equal to `unpack` bit
for bit, and the weight GEMM scheduled by the CPU rule against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from llvm_harness import UINT, build, run
from tvm import te

from tensorpress.compiler.formats import (
    decode_stage,
    fpx_codes,
    get_weight_format,
    sparse_format_with_values,
    sparse_weight_format_names,
)
from tensorpress.errors import TensorpressError
from tensorpress.schedules.cpu.weight_gemm import WeightGemm
from tensorpress.schedules.weight_gemm import make_weight_gemm

DENSITIES = (0.0, 0.001, 0.1, 0.5, 0.9, 1.0)
FORMATS = ("e3m2", "e2m3", "e2m2", "e2m1", "e4m3", "e1m0")  # FP6 x2, FP5, FP4, FP8, FP2: codes of 6 .. 8 .. 2 bits
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2})


def sparse_weight(m: int, k: int, density: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.01, 10, (m, 1)).astype(np.float32)
    w[rng.random((m, k)) >= density] = 0
    return w


def fpx_reference(w: np.ndarray, fmt: str) -> np.ndarray:
    """FPx's decode(encode(w)) with absmax scales (fpx_codes): what the sparse weight must store."""
    e, m = (int(p) for p in fmt[1:].split("m"))
    return fpx_codes.decode(*fpx_codes.encode(w, e, m), e, m)


def read_element(packed, row: int, col: int, ebits: int, mbits: int) -> float:
    """W[row, col] read from the stored arrays as the docstring's picture says, the rank bit by bit."""
    arrays = packed.arrays
    tm, tk, position = row // 16, col // 64, 64 * (row % 16) + col % 64
    words = [int(x) for x in arrays["bits"][tm, tk]]
    if not (words[position // 32] >> (position % 32)) & 1:
        return 0.0
    index = int(arrays["offsets"][tm, tk]) + sum((words[p // 32] >> (p % 32)) & 1 for p in range(position))
    stream = [int(x) for x in arrays["codes"][0]]
    bits = 1 + ebits + mbits
    first = index * bits  # the code's first bit counted along the stream's words, bit 0 of word 0 first
    code = sum(((stream[(first + b) // 32] >> ((first + b) % 32)) & 1) << b for b in range(bits))
    scale = arrays["scales"][row : row + 1]
    return float(fpx_codes.decode(np.array([[code]], np.uint8), scale, ebits, mbits)[0, 0])


def test_registered_as_the_fpx_twin_of_bitmap():
    assert sparse_format_with_values("bitmap", "e3m2") == "bitmap-e3m2"
    assert sparse_format_with_values("bitmap", "fp16") == "bitmap"
    assert sparse_format_with_values("ellpack", "e3m2") is None
    assert "bitmap-e3m2" not in sparse_weight_format_names()  # --sparse-format names the layouts only
    fmt = get_weight_format("bitmap-e3m2", "mse")
    assert fmt.sparse and fmt.code_bits() == 6 and fmt.scale_search == "mse"
    assert fmt.stored_bytes(64, 128) == get_weight_format("fp6").stored_bytes(64, 128)  # break-even: dense FP6
    assert fmt.unsupported_reason(64, 128) is None and "16" in fmt.unsupported_reason(40, 64)


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 70),
    k=st.integers(1, 150),
    density=st.sampled_from(DENSITIES),
    fmt=st.sampled_from(FORMATS),
    seed=st.integers(0, 2**16),
)
def test_unpack_is_fpx_of_the_weight(m, k, density, fmt, seed):
    w = sparse_weight(m, k, density, seed)
    packed = get_weight_format(f"bitmap-{fmt}").pack(w)
    got = get_weight_format(f"bitmap-{fmt}").unpack(packed)
    np.testing.assert_array_equal(got.view(np.uint32), fpx_reference(w, fmt).view(np.uint32))
    stored = int(np.count_nonzero(got.view(np.uint32)))  # -0 codes are stored: count bit patterns
    nnz = sum(bin(int(x)).count("1") for x in packed.arrays["bits"].reshape(-1))
    assert stored <= nnz <= int(np.count_nonzero(w))  # a weight whose code is +0 is not stored
    row_nonzeros = np.full(m, nnz // m)
    row_nonzeros[: nnz % m] += 1
    assert packed.nbytes == get_weight_format(f"bitmap-{fmt}").sparse_bytes(m, k, row_nonzeros)


@pytest.mark.parametrize("fmt", ["e3m2", "e2m1"])
def test_stored_arrays_read_element_by_element(fmt):
    w = sparse_weight(40, 150, 0.3, seed=1)
    w[16:32, 64:128] = 0  # an all-zero tile
    w[15, 127] = 5.0  # the last position of a tile (word 31, bit 31)
    w[0, 64] = -3.0  # and the first
    e, m = (int(p) for p in fmt[1:].split("m"))
    packed = get_weight_format(f"bitmap-{fmt}").pack(w)
    got = np.array([[read_element(packed, r, c, e, m) for c in range(150)] for r in range(40)], np.float32)
    np.testing.assert_array_equal(got, fpx_reference(w, fmt))
    assert (packed.arrays["bits"][1, 1] == 0).all()
    assert packed.arrays["bits"][0, 1, 31] >> 31 == 1 and packed.arrays["bits"][0, 1, 0] & 1 == 1


def test_fp6_bytes_at_80_percent():
    m, k = 256, 1024
    w = sparse_weight(m, k, 1.0, seed=2)
    from tensorpress.compiler.pruning import prune

    packed = get_weight_format("bitmap-e3m2").pack(prune(w, 0.8))
    kept = m * (k - int(np.floor(0.8 * k)))
    stream = -(-(kept + 33) // 32) * 32 * 6 // 8  # a spare code and a spare word, whole words
    assert packed.nbytes == stream + (m // 16) * (k // 64) * 33 * 4 + 2 * m
    assert packed.nbytes / (m * k) == pytest.approx(0.279, abs=0.003)  # 0.75 B a nonzero + the mask


def test_bad_weights_are_refused():
    fmt = get_weight_format("bitmap-e3m2")
    with pytest.raises(TensorpressError, match="inf or NaN"):
        fmt.pack(np.full((16, 16), np.nan, np.float32))
    with pytest.raises(TensorpressError, match="cannot be unpacked as bitmap-e3m2"):
        fmt.unpack(get_weight_format("bitmap-e2m3").pack(np.ones((16, 16), np.float32)))


@pytest.mark.parametrize("fmt, dtype", [("e3m2", "float32"), ("e2m2", "float16")])
def test_decode_matches_unpack_bit_for_bit(dtype, fmt):
    m, k = 48, 200
    w = sparse_weight(m, k, 0.3, seed=5)
    w[0:16, 128:192] = 0
    fmt_name = f"bitmap-{fmt}"
    packed = get_weight_format(fmt_name).pack(w)
    stage = decode_stage(fmt_name)
    stored = [te.placeholder(b.shape, b.dtype, name=b.name) for b in packed.buffers]
    decoded = te.compute((m, k), lambda r, c: stage.decode(stored, r, c, dtype), name="decode")
    got = run(build(te.create_prim_func([*stored, decoded])), list(packed.arrays.values()), (m, k), dtype)
    want = get_weight_format(fmt_name).unpack(packed).astype(dtype)
    np.testing.assert_array_equal(got.view(UINT[dtype]), want.view(UINT[dtype]))
    # row scale: unscaled * row_scale is the float32 weight exactly
    factored = te.compute(
        (m, k), lambda r, c: stage.unscaled_decode(stored, r, c, "float32") * stage.row_scale(stored, r), name="f"
    )
    got = run(build(te.create_prim_func([*stored, factored])), list(packed.arrays.values()), (m, k), "float32")
    np.testing.assert_array_equal(got.view(np.uint32), get_weight_format(fmt_name).unpack(packed).view(np.uint32))


@pytest.mark.parametrize("act", ["float32", "float16"])
def test_weight_gemm_scheduled_by_the_cpu_rule_matches_numpy(act):
    from tensorpress.compiler.pruning import prune

    m, k = 48, 192
    rng = np.random.default_rng(7)
    fmt = get_weight_format("bitmap-e3m2")
    packed = fmt.pack(prune(rng.standard_normal((m, k)).astype(np.float32), 0.8))
    w = fmt.unpack(packed).astype(np.float64)
    func = make_weight_gemm(fmt.decode_stage(), m, k, act, act, with_bias=True, buffers=packed.buffers)
    sch = WeightGemm().apply(func, AVX2, False)
    assert sch is not None
    call = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}), target=AVX2)
    for n in (1, 5, 17):
        x = rng.standard_normal((n, k)).astype(act)
        bias = rng.standard_normal(m).astype(act)
        y = run(call["main"], [x, *packed.arrays.values(), bias], (n, m), act)
        want = x.astype(np.float64) @ w.T + bias.astype(np.float64)
        tol = 2e-2 if act == "float16" else 1e-4
        np.testing.assert_allclose(y.astype(np.float64), want, rtol=tol, atol=tol)
