"""tiled-csl (`compiler/formats/tiled_csl.py`): the numpy reference (pack -> unpack is the weight in fp16
bit for bit, hypothesis-fuzzed densities 0 .. 100%, odd shapes; the words read one by one as the
docstring's picture says, counts in whole 128-bit loads, a fully dense tile, the bytes; bad arrays
refused), the registered format, and its TIR scatter decode built for llvm (the weight GEMM's "decode"
block, through the CPU rules) against `unpack` and numpy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorpress.compiler.formats import decode_stage, get_weight_format, sparse_weight_format_names
from tensorpress.compiler.formats.tiled_csl import pack_tiled_csl, tiled_csl_bytes, unpack_tiled_csl
from tensorpress.errors import TensorpressError

DENSITIES = (0.0, 0.001, 0.1, 0.5, 0.9, 1.0)


def sparse_weight(m: int, k: int, density: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, k)).astype(np.float32)
    w[rng.random((m, k)) >= density] = 0
    return w


def scatter_by_hand(arrays: dict[str, np.ndarray], m: int, k: int) -> np.ndarray:
    """The picture, word by word: each tile zero, then W[16 tm + p // 64, 64 tk + p % 64] = value."""
    tk_count = -(-k // 64)
    out = np.zeros((-(-m // 16) * 16, tk_count * 64), np.float16)
    offsets = arrays["offsets"]
    for t in range(offsets.shape[0] * tk_count):
        tm, tk = divmod(t, tk_count)
        for word in arrays["words"][offsets[tm, tk] : offsets[tm, tk + 1]]:
            p = int(word) & 0xFFFF
            out[16 * tm + p // 64, 64 * tk + p % 64] = np.uint16(int(word) >> 16).view(np.float16)
    return out[:m, :k].astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 70), k=st.integers(1, 200), density=st.sampled_from(DENSITIES), seed=st.integers(0, 2**16))
def test_unpack_is_the_weight_in_fp16(m, k, density, seed):
    w = sparse_weight(m, k, density, seed)
    arrays = pack_tiled_csl(w)
    want = w.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(unpack_tiled_csl(arrays, m, k).view(np.uint32), want.view(np.uint32))
    offsets = arrays["offsets"]
    assert (offsets[1:, 0] == offsets[:-1, -1]).all()  # a row's end is the next row's start
    counts = np.diff(offsets, axis=1).reshape(-1)
    assert (counts % 4 == 0).all() and arrays["words"].size == offsets[-1, -1] and offsets[0, 0] == 0
    tk = -(-k // 64)
    patterns = w.astype(np.float16).view(np.uint16)
    nonzeros = np.array(
        [np.count_nonzero(patterns[16 * (t // tk) :][:16, 64 * (t % tk) :][:, :64]) for t in range(counts.size)]
    )
    assert counts.size == -(-m // 16) * tk and (counts == -(-nonzeros // 4) * 4).all()
    assert sum(a.nbytes for a in arrays.values()) == tiled_csl_bytes(m, k, nonzeros)


def test_words_read_one_by_one_and_a_fully_dense_tile():
    w = sparse_weight(40, 150, 0.3, seed=1)
    w[0:16, 0:64] = np.arange(1, 1025).reshape(16, 64) / 64  # a fully dense tile: 1024 words, no padding
    w[16:32, 64:128] = 0  # an empty tile: no word
    w[32:48, 64:128] = 0
    w[33, 65] = -2.5  # a tile (2, 1) holding one nonzero: 3 padding words, copies of it
    arrays = pack_tiled_csl(w)
    np.testing.assert_array_equal(scatter_by_hand(arrays, 40, 150), w.astype(np.float16).astype(np.float32))
    offsets = arrays["offsets"]  # [TM, TK + 1] = [3, 4]
    assert offsets[0, 1] - offsets[0, 0] == 1024 and offsets[1, 2] == offsets[1, 1]  # tile (1, 1) is empty
    lone = arrays["words"][offsets[2, 1] : offsets[2, 2]]
    assert lone.size == 4 and (lone == lone[0]).all() and lone[0] & 0xFFFF == 64 + 1


def test_negative_zero_is_kept_and_bad_input_refused():
    w = np.zeros((16, 64), np.float32)
    w[0, 3] = -0.0
    arrays = pack_tiled_csl(w)
    assert arrays["words"].size == 4 and unpack_tiled_csl(arrays, 16, 64).view(np.uint32)[0, 3] == 0x80000000
    with pytest.raises(TensorpressError, match="inf or NaN"):
        pack_tiled_csl(np.full((16, 16), np.inf, np.float32))
    bad = dict(arrays, words=arrays["words"] | np.uint32(0x7FF))  # a position past the tile
    with pytest.raises(TensorpressError, match="outside its 16 x 64 tile"):
        unpack_tiled_csl(bad, 16, 64)
    with pytest.raises(TensorpressError, match="do not fit"):
        unpack_tiled_csl(arrays, 32, 64)


def test_registered_as_a_sparse_format():
    assert "tiled-csl" in sparse_weight_format_names()
    fmt = get_weight_format("tiled-csl")
    assert fmt.sparse and fmt.auto_targets == ("cuda",) and fmt.stored_bytes(64, 128) == 2 * 64 * 128
    assert decode_stage("tiled-csl").tile_scatter is not None
    with pytest.raises(NotImplementedError, match="scatter"):
        decode_stage("tiled-csl").decode([], 0, 0, "float16")
    w = sparse_weight(48, 200, 0.2, seed=4)
    packed = fmt.pack(w)
    assert packed.nbytes <= fmt.sparse_bytes(48, 200, (w != 0).sum(axis=1))  # auto's estimate is an upper bound


def _cpu_gemm(packed, m: int, k: int, with_bias: bool):
    """The weight GEMM of `packed` (float32 activations) scheduled by the CPU rules, built for llvm."""
    import tvm
    from tvm.s_tir import dlight as dl

    from tensorpress.schedules.cpu import cpu_rules
    from tensorpress.schedules.weight_gemm import make_weight_gemm

    func = make_weight_gemm(decode_stage("tiled-csl"), m, k, "float32", with_bias=with_bias, buffers=packed.buffers)
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    with target:
        mod = dl.ApplyDefaultSchedule(*cpu_rules())(tvm.IRModule({"main": func}))
    assert "panel" in str(mod["main"].attrs["tensorpress.template_config"])  # our rule, not the fallback
    return tvm.compile(mod, target=target)["main"]


@pytest.mark.parametrize("density", [0.0, 0.001, 0.5, 1.0])
def test_scatter_decode_built_for_llvm_is_unpack(density):
    """Y = I . W^T through the kernel is W itself (fp32 sums of one product each): the TIR scatter's W
    equals unpack at every position, a fully dense weight and an empty one included."""
    from llvm_harness import run

    m, k = 40, 200  # M and K not multiples of the 16 x 64 tiles
    w = sparse_weight(m, k, density, seed=int(density * 1000) + 1)
    w[0:16, 0:64] = np.arange(1, 1025).reshape(16, 64) / 64 if density else 0  # a fully dense tile
    fmt = get_weight_format("tiled-csl")
    packed = fmt.pack(w)
    y = run(_cpu_gemm(packed, m, k, False), [np.eye(k, dtype=np.float32), *packed.arrays.values()], (k, m), "float32")
    np.testing.assert_array_equal(y.T, fmt.unpack(packed))


def test_cpu_weight_gemm_matches_numpy():
    from llvm_harness import run

    m, k = 48, 160
    rng = np.random.default_rng(7)
    w = sparse_weight(m, k, 0.2, seed=8)
    packed = get_weight_format("tiled-csl").pack(w)
    x = rng.standard_normal((5, k)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    y = run(_cpu_gemm(packed, m, k, True), [x, *packed.arrays.values(), bias], (5, m), "float32")
    w_hat = w.astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(y, x.astype(np.float64) @ w_hat.T + bias, rtol=1e-5, atol=1e-4)
