"""The KV pool's sizing and allocation from a manifest's decoder section (`runtime/kv_pool.py`)."""

from __future__ import annotations

import numpy as np
import pytest

from tensorpress.errors import InputError
from tensorpress.runtime.kv_pool import allocate_pool, bytes_per_page, cache_tensors_of, pool_pages

INT8 = {
    "page_size": 16,
    "cache_tensors": [
        {"name": "kv_codes", "shape": [2, "num_pages", 2, 4, 16, 64], "dtype": "int8"},
        {"name": "kv_scales", "shape": [2, "num_pages", 2, 4, 16], "dtype": "float32"},
    ],
}
OLD = {"page_size": 16, "cache_shape": [2, "num_pages", 2, 4, 16, 64], "cache_dtype": "float16"}


def numpy_empty(shape, dtype):
    return np.empty(shape, dtype)


def test_bytes_per_page_counts_every_listed_tensor_or_takes_the_manifests_figure():
    per_token = 2 * 2 * 4 * (64 * 1 + 4)  # layers x K/V x heads x (codes + one fp32 scale)
    assert bytes_per_page(INT8) == 16 * per_token
    assert bytes_per_page({**INT8, "bytes_per_token": 1000}) == 16_000
    assert bytes_per_page(OLD) == 16 * 2 * 2 * 4 * 64 * 2


def test_an_artifact_from_before_the_list_has_its_one_tensor():
    assert cache_tensors_of(OLD) == [{"name": "kv_pages", "shape": OLD["cache_shape"], "dtype": "float16"}]
    (pages,) = allocate_pool(OLD, 3, numpy_empty, free_bytes=1 << 30)
    assert pages.shape == (2, 3, 2, 4, 16, 64) and pages.dtype == np.float16


def test_pool_pages_by_tokens_or_by_memory_fraction():
    assert pool_pages(INT8, 100, None, lambda: 0) == 7  # ceil(100 / 16)
    assert pool_pages(INT8, None, None, lambda: 0) == 4096 // 16
    assert pool_pages(INT8, None, 0.5, lambda: 10 * bytes_per_page(INT8)) == 5
    with pytest.raises(InputError, match="not both"):
        pool_pages(INT8, 100, 0.5, lambda: 0)
    with pytest.raises(InputError, match=r"memory_fraction must be in \(0, 1\]"):
        pool_pages(INT8, None, 1.5, lambda: 0)
    with pytest.raises(InputError, match="at least 1"):
        pool_pages(INT8, 0, None, lambda: 0)


def test_allocation_makes_exactly_the_listed_tensors_and_refuses_what_cannot_fit():
    codes, scales = allocate_pool(INT8, 5, numpy_empty, free_bytes=1 << 30)
    assert codes.shape == (2, 5, 2, 4, 16, 64) and codes.dtype == np.int8
    assert scales.shape == (2, 5, 2, 4, 16) and scales.dtype == np.float32
    with pytest.raises(InputError, match="needs .* GiB but the device has .* free; lower max_total_tokens"):
        allocate_pool(INT8, 5, numpy_empty, free_bytes=5 * bytes_per_page(INT8) - 1)

    def failing(shape, dtype):
        raise MemoryError

    with pytest.raises(InputError, match="could not be allocated"):
        allocate_pool(INT8, 5, failing, free_bytes=1 << 30)
