"""The int4 KV-cache format: its numpy reference against a plain float64 rendering of the recipe (round
trip within the documented bound, constant rows, the nibble order), and its TIR append + page read built
for llvm, bit for bit against that reference."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from llvm_harness import build_kv_append_and_read

from tensorpress.compiler.formats import get_kv_cache_format
from tensorpress.compiler.formats.kv_int4 import Int4KVCache, pack_nibbles, unpack_nibbles
from tensorpress.errors import ShapeError

INT4 = get_kv_cache_format("int4")


def test_cache_tensors_and_bytes_per_token():
    assert isinstance(INT4, Int4KVCache) and INT4.code_bits("float16") == 4
    tensors = INT4.cache_tensors(4, 2, 16, 32, "float16")
    assert [(t.name, t.shape, t.dtype) for t in tensors] == [
        ("kv_codes", (4, "num_pages", 2, 2, 16, 16), "uint8"),
        ("kv_min_scale", (4, "num_pages", 2, 2, 16, 2), "float16"),
    ]
    # per layer, K and V, kv head: D/2 code bytes + an fp16 min and scale
    assert INT4.bytes_per_token(4, 2, 32, "float16") == 4 * 2 * 2 * (16 + 4)
    assert INT4.bytes_per_token(32, 8, 128, "float16") * 8 / (2 * 32 * 8 * 128) == 4.25


def test_an_odd_head_dim_is_refused_in_one_sentence():
    with pytest.raises(ShapeError, match="even head_dim, got 7"):
        INT4.cache_tensors(1, 1, 16, 7, "float32")


def test_nibbles_hold_the_even_element_low():
    codes = np.array([[1, 2, 15, 0, 7, 9]])
    packed = pack_nibbles(codes)
    assert packed.dtype == np.uint8 and list(packed[0]) == [0x21, 0x0F, 0x97]
    np.testing.assert_array_equal(unpack_nibbles(packed), codes)


def _recipe_float64(rows):
    """The int4 recipe written out in float64 with fp16 rounding of min and scale (an independent
    rendering): the dequantised rows and each row's (min, scale)."""
    x = rows.astype(np.float64)
    low = np.float16(np.clip(x.min(1), -65504, 65504)).astype(np.float64)
    scale = np.float16(np.clip((x.max(1) - low) / 15, 0, 65504)).astype(np.float64)
    codes = np.zeros_like(x)
    nonzero = scale > 0
    codes[nonzero] = np.clip(np.round((x[nonzero] - low[nonzero, None]) / scale[nonzero, None]), 0, 15)
    return low[:, None] + codes * scale[:, None], low, scale


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_matches_the_recipe_and_stays_within_the_bound(dtype):
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((256, 64)) * rng.uniform(1e-2, 30, (256, 1)) + rng.uniform(-5, 5, (256, 1))).astype(
        dtype
    )
    codes, min_scale = INT4.quantize(rows, dtype)
    assert codes.dtype == np.uint8 and codes.shape == (256, 32)
    assert min_scale.dtype == np.float16 and min_scale.shape == (256, 2)
    got = INT4.dequantize((codes, min_scale), "float32").astype(np.float64)
    expected, low, scale = _recipe_float64(rows)
    np.testing.assert_array_equal(min_scale[:, 0].astype(np.float64), low)
    # the scale is rounded to fp32 then fp16 (the recipe's float64 goes to fp16 once): an ulp apart at most
    assert np.abs(min_scale[:, 1].astype(np.float64) - scale).max() <= 2**-10 * scale.max()
    # float32 arithmetic vs float64: only ties may differ, by one level at most
    assert np.abs(got - expected).max() <= scale.max() * (1 + 1e-6)
    assert (np.abs(got - expected) > 1e-5 * (np.abs(expected) + 1)).mean() < 1e-3
    x = rows.astype(np.float64)
    exact_scale = (x.max(1) - low) / 15
    bound = scale / 2 + 15 * np.abs(scale - exact_scale) + np.maximum(low - x.min(1), 0) + 1e-6 * np.abs(x).max(1)
    assert (np.abs(got - x) <= bound[:, None]).all()
    assert (np.abs(got - x) > scale[:, None] / 2 * 0.9).any()  # the bound is reached, not vacuous
    levels = unpack_nibbles(codes)
    assert levels.max(1).min() >= 14 and levels.min(1).max() == 0  # each row spans the grid


def test_constant_zero_and_extreme_rows():
    rows = np.zeros((4, 8), np.float32)
    rows[1] = 2.5  # constant and exact in fp16: scale 0, every code 0
    rows[2] = [1e6, -1e6, 0, 0, 0, 0, 0, 0]  # beyond fp16: min saturates at -65504
    rows[3] = [0, 15, 7.5, 22.5 / 3, 1, 2, 3, 4]  # scale exactly 1: 7.5 ties to 8 (even)
    codes, min_scale = INT4.quantize(rows, "float32")
    out = INT4.dequantize((codes, min_scale), "float32")
    assert (codes[0] == 0).all() and (out[0] == 0).all()
    assert (codes[1] == 0).all() and (out[1] == 2.5).all() and min_scale[1, 1] == 0
    inexact = INT4.quantize(np.full((1, 8), 3.7, np.float32), "float32")  # fp16(3.7) < 3.7: the tiny
    assert (np.abs(INT4.dequantize(inexact, "float32") - np.float32(3.7)) < 1e-5).all()  # scale lifts it
    assert min_scale[2, 0] == np.float16(-65504) and np.isfinite(out[2]).all()
    assert list(unpack_nibbles(codes)[3]) == [0, 15, 8, 8, 1, 2, 3, 4]


def _append_and_read_lib(dtype, D):
    from tvm.script import tirx as T

    KVH, PS = 2, 4

    @T.prim_func(private=True, s_tir=True)
    def read_all(
        codes: T.Buffer((2, 5, 2, KVH, PS, D // 2), "uint8"),
        min_scale: T.Buffer((2, 5, 2, KVH, PS, 2), "float16"),
        out: T.Buffer((2, 5, 2, KVH, PS, D), dtype),
    ):
        for a, p, kv, g, r, d in T.grid(2, 5, 2, KVH, PS, D):
            with T.sblock("read"):
                va, vp, vkv, vg, vr, vd = T.axis.remap("SSSSSS", [a, p, kv, g, r, d])
                out[va, vp, vkv, vg, vr, vd] = T.if_then_else(
                    vkv == 0,
                    INT4.read([codes, min_scale], va, vp, 0, vg, vr, vd, dtype),
                    INT4.read([codes, min_scale], va, vp, 1, vg, vr, vd, dtype),
                )

    return build_kv_append_and_read(INT4, read_all, KVH, D, PS, dtype)


@pytest.mark.parametrize("dtype, D", [("float32", 16), ("float16", 16), ("float32", 6)])
def test_tir_append_and_read_equal_the_numpy_reference_bit_for_bit(dtype, D):
    lib = _append_and_read_lib(dtype, D)
    rng = np.random.default_rng(1)
    n, layer = 7, 1
    k = (rng.standard_normal((n, 2, D)) * rng.uniform(0.01, 8, (n, 2, 1)) + 1).astype(dtype)
    v = (rng.standard_normal((n, 2, D)) * 3).astype(dtype)
    k[3, 1] = 0  # an all-zero row
    v[2, 0] = 2.5  # a constant row
    positions = np.array([0, 1, 2, 5, 0, 3, 4], np.int32)
    seq_slot = np.array([0, 0, 0, 0, 1, 1, 1], np.int32)
    block_table = np.array([[4, 2], [1, 3]], np.int32)
    codes = np.zeros((2, 5, 2, 2, 4, D // 2), np.uint8)
    min_scale = np.zeros((2, 5, 2, 2, 4, 2), np.float16)
    tensors = [tvm.runtime.tensor(a) for a in (codes, min_scale, k, v, positions, seq_slot, block_table)]
    lib["append"](*tensors, layer)
    expected_codes, expected_params = codes.copy(), min_scale.copy()
    for i, (p, s) in enumerate(zip(positions, seq_slot)):
        page, row = block_table[s, p // 4], p % 4
        for kv, x in ((0, k[i]), (1, v[i])):
            c, ms = INT4.quantize(x, dtype)
            expected_codes[layer, page, kv, :, row], expected_params[layer, page, kv, :, row] = c, ms
    np.testing.assert_array_equal(tensors[0].numpy(), expected_codes)
    np.testing.assert_array_equal(tensors[1].numpy(), expected_params)
    out = tvm.runtime.empty((2, 5, 2, 2, 4, D), dtype)
    lib["read"](tensors[0], tensors[1], out)
    expected = INT4.dequantize((expected_codes, expected_params), dtype)
    np.testing.assert_array_equal(out.numpy(), expected)
