"""The int8 KV-cache format: its numpy reference (round trip within scale / 2, zero rows, extremes) and
its TIR append + page read built for llvm, bit for bit against that reference; the registry's names."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from llvm_harness import build_kv_append_and_read

from tensorpress.compiler.formats import FORMATS, get_kv_cache_format, kv_cache_format_names
from tensorpress.compiler.formats.kv_int8 import Int8KVCache
from tensorpress.errors import ConfigError

INT8 = get_kv_cache_format("int8")


def test_registry_names_the_kv_formats_and_refuses_others():
    names = ["auto", "fp16", "fp32", "int8", "int4", "int2-kitty", "int2-oscar"]
    assert kv_cache_format_names() == list(FORMATS["kv_cache"]) == names
    assert isinstance(INT8, Int8KVCache) and INT8.name == "int8"
    with pytest.raises(ConfigError, match="valid names: auto, fp16, fp32, int8, int4, int2-kitty, int2-oscar"):
        get_kv_cache_format("int3")


def test_cache_tensors_and_bytes_per_token():
    tensors = INT8.cache_tensors(4, 2, 16, 32, "float16")
    assert [(t.name, t.shape, t.dtype) for t in tensors] == [
        ("kv_codes", (4, "num_pages", 2, 2, 16, 32), "int8"),
        ("kv_scales", (4, "num_pages", 2, 2, 16), "float32"),
    ]
    assert INT8.bytes_per_token(4, 2, 32, "float16") == 4 * 2 * 2 * (32 + 4)
    assert get_kv_cache_format("auto").bytes_per_token(4, 2, 32, "float16") == 4 * 2 * 2 * 32 * 2


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_error_is_at_most_half_a_scale(dtype):
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((64, 32)) * rng.uniform(1e-3, 30, (64, 1))).astype(dtype)
    codes, scales = INT8.quantize(rows, dtype)
    assert codes.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == (64,)
    exact = INT8.dequantize((codes, scales), "float32")
    error = np.abs(exact.astype(np.float64) - rows.astype(np.float64))
    assert (error <= scales[:, None].astype(np.float64) / 2 * (1 + 1e-6)).all()
    assert np.abs(codes).max(axis=1).min() == 127  # each row's absmax maps to ±127
    np.testing.assert_array_equal(scales, np.abs(rows.astype(np.float32)).max(axis=1) / np.float32(127))


def test_zero_rows_and_extremes():
    rows = np.zeros((4, 8), np.float32)
    rows[1] = [3e38, -3e38, 1, 0, 0, 0, 0, 0]  # near float32's largest
    rows[2] = [1e-40, -1e-40, 0, 0, 0, 0, 0, 0]  # subnormal
    rows[3] = [-2.5, 2.5, 0.5 * 2.5 / 127, 1.5 * 2.5 / 127, 0, 0, 0, 0]  # ties round half to even
    codes, scales = INT8.quantize(rows, "float32")
    assert scales[0] == 0 and (codes[0] == 0).all()
    assert (INT8.dequantize((codes, scales), "float32")[0] == 0).all()
    assert list(codes[1, :3]) == [127, -127, 0]
    assert list(codes[2, :2]) == [127, -127]
    assert list(codes[3, :4]) == [-127, 127, 0, 2]
    assert np.isfinite(INT8.dequantize((codes, scales), "float32")).all()


def _append_and_read_lib(dtype):
    from tvm.script import tirx as T

    KVH, D, PS = 2, 16, 4

    @T.prim_func(private=True, s_tir=True)
    def read_all(
        codes: T.Buffer((2, 5, 2, KVH, PS, D), "int8"),
        scales: T.Buffer((2, 5, 2, KVH, PS), "float32"),
        out: T.Buffer((2, 5, 2, KVH, PS, D), dtype),
    ):
        for a, p, kv, g, r, d in T.grid(2, 5, 2, KVH, PS, D):
            with T.sblock("read"):
                va, vp, vkv, vg, vr, vd = T.axis.remap("SSSSSS", [a, p, kv, g, r, d])
                out[va, vp, vkv, vg, vr, vd] = T.if_then_else(
                    vkv == 0,
                    INT8.read([codes, scales], va, vp, 0, vg, vr, vd, dtype),
                    INT8.read([codes, scales], va, vp, 1, vg, vr, vd, dtype),
                )

    return build_kv_append_and_read(INT8, read_all, KVH, D, PS, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tir_append_and_read_equal_the_numpy_reference_bit_for_bit(dtype):
    lib = _append_and_read_lib(dtype)
    rng = np.random.default_rng(1)
    n, layer = 7, 1
    k = (rng.standard_normal((n, 2, 16)) * rng.uniform(0.01, 8, (n, 2, 1))).astype(dtype)
    v = (rng.standard_normal((n, 2, 16)) * 3).astype(dtype)
    k[3, 1] = 0  # an all-zero row
    positions = np.array([0, 1, 2, 5, 0, 3, 4], np.int32)
    seq_slot = np.array([0, 0, 0, 0, 1, 1, 1], np.int32)
    block_table = np.array([[4, 2], [1, 3]], np.int32)
    codes = np.zeros((2, 5, 2, 2, 4, 16), np.int8)
    scales = np.zeros((2, 5, 2, 2, 4), np.float32)
    tensors = [tvm.runtime.tensor(a) for a in (codes, scales, k, v, positions, seq_slot, block_table)]
    lib["append"](*tensors, layer)
    expected_codes, expected_scales = codes.copy(), scales.copy()
    for i, (p, s) in enumerate(zip(positions, seq_slot)):
        page, row = block_table[s, p // 4], p % 4
        for kv, x in ((0, k[i]), (1, v[i])):
            c, sc = INT8.quantize(x, dtype)
            expected_codes[layer, page, kv, :, row], expected_scales[layer, page, kv, :, row] = c, sc
    np.testing.assert_array_equal(tensors[0].numpy(), expected_codes)
    np.testing.assert_array_equal(tensors[1].numpy(), expected_scales)
    out = tvm.runtime.empty(codes.shape, dtype)
    lib["read"](tensors[0], tensors[1], out)
    expected = INT8.dequantize((expected_codes, expected_scales), dtype)
    np.testing.assert_array_equal(out.numpy(), expected)
