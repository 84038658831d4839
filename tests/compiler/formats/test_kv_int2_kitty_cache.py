"""The int2-kitty KV cache (`Int2KittyKVCache`): its quantise kernel built for llvm writes the numpy page
reference bit for bit (fp32 and fp16 models, both boost fractions, channels tied in strength), its one
page read gives `dequantize_page` bit for bit through tagged block-table entries (and the full-precision
page through untagged ones), its tensors and bytes, and its options refused in one sentence."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from llvm_harness import assert_tagged_reads_bit_for_bit, build_kv_kernels, page_read_func, zero_cache_arrays

from tensorpress.compiler.compression_configs import KVCacheConfig
from tensorpress.compiler.formats import get_kv_cache_format
from tensorpress.compiler.formats.kv_int2_kitty import Int2KittyKVCache, bits_per_element
from tensorpress.errors import ConfigError
from tensorpress.schedules.kv_attention import kv_quantize_pages_func

L, KVH, D, PS = 2, 2, 32, 8


def _head_slices(stored, layer, q, g):
    """One kv head's slices of the quantised tensors (kv_q_codes has its K/V axis before the head)."""
    return [stored[0][layer, q, :, g], *(a[layer, q, g] for a in stored[1:])]


def _page_rows(pages, layer, fp_pages, kv, g):
    return pages[layer, fp_pages, kv, g].reshape(-1, pages.shape[-1])


@pytest.mark.parametrize("dtype, fraction", [("float32", 0.25), ("float16", 0.125)])
def test_the_quantise_kernel_writes_the_numpy_page_reference_bit_for_bit(dtype, fraction):
    fmt = Int2KittyKVCache(boost_fraction=fraction, page_tokens=32)  # G = 4 runtime pages of 8
    rng = np.random.default_rng(7)
    pages = (rng.standard_normal((L, 12, 2, KVH, PS, D)) * rng.uniform(0.1, 6, D) + rng.uniform(-2, 2, D)).astype(dtype)
    pages[1, 5, 0, 1, :, 3:9] = 0.5  # constant channels: equal strength (ties go to the lower index), scale 0
    src = np.array([[9, 2, 5, 0], [3, 11, 1, 7]], np.int32)
    dst = np.array([2, 0], np.int32)
    lib = build_kv_kernels({"quantize": kv_quantize_pages_func(fmt, KVH, D, PS, dtype)})
    cache = [tvm.runtime.tensor(a) for a in [pages, *zero_cache_arrays(fmt.quantised_tensors(L, KVH, D, dtype), 0, 3)]]
    lib["quantize"](*cache, tvm.runtime.tensor(src), tvm.runtime.tensor(dst))
    stored = [t.numpy() for t in cache[1:]]
    for k in range(len(src)):
        for layer in range(L):
            for g in range(KVH):
                keys, values = (_page_rows(pages, layer, src[k], kv, g) for kv in (0, 1))
                expected = fmt.quantize_page(keys, values)
                for got, want in zip(_head_slices(stored, layer, dst[k], g), expected):
                    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    assert not stored[0][:, 1].any()  # the page not written stays as it was


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_page_read_gives_dequantize_page_through_tagged_entries_bit_for_bit(dtype):
    fmt = Int2KittyKVCache(page_tokens=16)  # G = 2
    rng = np.random.default_rng(8)
    func, tensors = page_read_func(fmt, dtype, (L, KVH, PS, D), 6, pages=4, quantised_pages=3)
    pages = rng.standard_normal((L, 4, 2, KVH, PS, D)).astype(dtype)
    stored = zero_cache_arrays(tensors[1:], 0, 3)
    references = {}
    for q in (1, 2):
        for layer in range(L):
            for g in range(KVH):
                keys, values = (
                    (rng.standard_normal((16, D)) * rng.uniform(0.2, 5, D)).astype(dtype),
                    rng.standard_normal((16, D)).astype(dtype),
                )
                page = fmt.quantize_page(keys, values)
                stored[0][layer, q, :, g] = page[0]
                for array, part in zip(stored[1:], page[1:]):
                    array[layer, q, g] = part
                references[q, layer, g] = fmt.dequantize_page(page, dtype)
    # entries: fp page 3, q page 2 sub 1, q page 1 sub 0, fp page 0, q page 1 sub 1, q page 2 sub 0
    table = np.array([3, -1 - 5, -1 - 2, 0, -1 - 3, -1 - 4], np.int32)
    assert_tagged_reads_bit_for_bit(func, pages, stored, table, references, group=2)


def test_tensors_bytes_and_the_issues_bit_budget():
    fmt = get_kv_cache_format("int2-kitty")
    assert isinstance(fmt, Int2KittyKVCache) and (fmt.sink, fmt.window, fmt.page_tokens) == (32, 128, 128)
    tensors = fmt.cache_tensors(32, 8, 16, 128, "float16")
    assert tensors[0].shape == (32, "num_pages", 2, 8, 16, 128) and tensors[0].dtype == "float16"
    assert [t.shape[1] for t in tensors[1:]] == ["num_quantised_pages"] * 5
    per_token = fmt.bytes_per_token(32, 8, 128, "float16")
    assert per_token * 8 / (2 * 32 * 8 * 128) == pytest.approx(bits_per_element(128, 128, 0.25), abs=1e-3)
    assert bits_per_element(128, 128, 0.25) <= 2.6
    assert fmt.page_quantisation(32, 8, 128, 16, "float16").group_pages == 8


def test_options_are_set_through_the_config_and_bad_ones_refused():
    fmt = KVCacheConfig("int2-kitty", boost_fraction=0.125, sink=16, window=64).kv_cache_format()
    assert (fmt.boost_fraction, fmt.sink, fmt.window, fmt.page_tokens) == (0.125, 16, 64, 128)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="boost_fraction must be one of"):
        KVCacheConfig("int2-kitty", boost_fraction=0.3)
    with pytest.raises(ConfigError, match="applies to page-granular formats"):
        KVCacheConfig("int4", window=64)
    with pytest.raises(ConfigError, match="must be whole runtime pages of 16"):
        Int2KittyKVCache(page_tokens=24).cache_tensors(1, 1, 16, 32, "float32")
