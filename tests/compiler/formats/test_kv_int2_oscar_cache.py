"""The int2-oscar KV cache (`Int2OscarKVCache`): its quantise kernel built for llvm writes the numpy page
reference bit for bit (fp32 and fp16 models, rows with ties and constant rows), its one page read gives
`dequantize_page` bit for bit through tagged block-table entries (and the full-precision page through
untagged ones), its tensors and bytes, and its options refused in one sentence."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from llvm_harness import assert_tagged_reads_bit_for_bit, build_kv_kernels, page_read_func, zero_cache_arrays

from tensorpress.compiler.compression_configs import KVCacheConfig
from tensorpress.compiler.formats import get_kv_cache_format
from tensorpress.compiler.formats.kv_int2_oscar import Int2OscarKVCache, bits_per_element
from tensorpress.errors import ConfigError
from tensorpress.schedules.kv_attention import kv_quantize_pages_func

L, KVH, D, PS = 2, 2, 32, 8


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_quantise_kernel_writes_the_numpy_page_reference_bit_for_bit(dtype):
    fmt = Int2OscarKVCache(page_tokens=16)  # G = 2 runtime pages of 8
    rng = np.random.default_rng(7)
    pages = (rng.standard_normal((L, 12, 2, KVH, PS, D)) * rng.uniform(0.1, 6, (PS, D))).astype(dtype)
    pages[1, 5, 0, 1, 2] = 0.5  # a constant row: scale 0, every code 0
    pages[0, 9, 1, 0, 3, ::2] = 1.25  # half the row tied: the rank breaks ties by channel
    pages[0, 2, 0, 1, 4, :6] = -0.0  # signed zeros tie with zeros
    pages[0, 2, 0, 1, 4, 6:12] = 0.0
    src = np.array([[9, 2], [5, 11], [3, 0]], np.int32)
    dst = np.array([2, 0, 3], np.int32)
    lib = build_kv_kernels({"quantize": kv_quantize_pages_func(fmt, KVH, D, PS, dtype)})
    cache = [tvm.runtime.tensor(a) for a in [pages, *zero_cache_arrays(fmt.quantised_tensors(L, KVH, D, dtype), 0, 5)]]
    lib["quantize"](*cache, tvm.runtime.tensor(src), tvm.runtime.tensor(dst))
    codes, min_scale = (t.numpy() for t in cache[1:])
    for k in range(len(src)):
        for layer in range(L):
            for g in range(KVH):
                keys, values = (pages[layer, src[k], kv, g].reshape(-1, D) for kv in (0, 1))
                want_codes, want_ms = fmt.quantize_page(keys, values)
                np.testing.assert_array_equal(codes[layer, dst[k], :, g], want_codes)
                np.testing.assert_array_equal(min_scale[layer, dst[k], :, g].view(np.uint16), want_ms.view(np.uint16))
    assert not codes[:, 1].any() and not codes[:, 4].any()  # the pages not written stay as they were


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_page_read_gives_dequantize_page_through_tagged_entries_bit_for_bit(dtype):
    fmt = Int2OscarKVCache(page_tokens=16)  # G = 2
    rng = np.random.default_rng(8)
    func, tensors = page_read_func(fmt, dtype, (L, KVH, PS, D), 6, pages=4, quantised_pages=3)
    pages = rng.standard_normal((L, 4, 2, KVH, PS, D)).astype(dtype)
    codes, min_scale = zero_cache_arrays(tensors[1:], 0, 3)
    references = {}
    for q in (1, 2):
        for layer in range(L):
            for g in range(KVH):
                keys, values = (rng.standard_normal((2, 16, D)) * rng.uniform(0.2, 5, (16, 1))).astype(dtype)
                page = fmt.quantize_page(keys, values)
                codes[layer, q, :, g], min_scale[layer, q, :, g] = page
                references[q, layer, g] = fmt.dequantize_page(page, dtype)
    table = np.array([3, -1 - 5, -1 - 2, 0, -1 - 3, -1 - 4], np.int32)  # fp 3, q2 sub1, q1 sub0, fp 0, ...
    assert_tagged_reads_bit_for_bit(func, pages, (codes, min_scale), table, references, group=2)


def test_tensors_bytes_and_bits_per_element():
    fmt = get_kv_cache_format("int2-oscar")
    assert isinstance(fmt, Int2OscarKVCache) and (fmt.sink, fmt.window, fmt.page_tokens) == (32, 128, 16)
    tensors = fmt.cache_tensors(32, 8, 16, 128, "float16")
    assert tensors[0].shape == (32, "num_pages", 2, 8, 16, 128)
    assert [t.shape for t in tensors[1:]] == [
        (32, "num_quantised_pages", 2, 8, 16, 32),
        (32, "num_quantised_pages", 2, 8, 16, 2),
    ]
    per_token = fmt.bytes_per_token(32, 8, 128, "float16")
    assert per_token == 32 * 8 * 2 * (128 // 4 + 4)  # codes + fp16 min and scale, K and V, every layer
    assert per_token * 8 / (2 * 32 * 8 * 128) == bits_per_element(128) == 2.25
    assert fmt.code_bits("float16") == 2 and fmt.page_quantisation(32, 8, 128, 16, "float16").group_pages == 1


def test_options_are_set_through_the_config_and_bad_ones_refused():
    fmt = KVCacheConfig("int2-oscar", sink=16, window=64, page_tokens=32).kv_cache_format()
    assert (fmt.sink, fmt.window, fmt.page_tokens) == (16, 64, 32)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="boost_fraction applies to int2-kitty"):
        KVCacheConfig("int2-oscar", boost_fraction=0.25)
    with pytest.raises(ConfigError, match="window must be a whole number"):
        KVCacheConfig("int2-oscar", window=-1)
    with pytest.raises(ConfigError, match="head_dim 30 must be a multiple of 4"):
        Int2OscarKVCache().cache_tensors(1, 1, 16, 30, "float32")
    with pytest.raises(ConfigError, match="key_clip must be a fraction"):
        Int2OscarKVCache(key_clip=0.3)
