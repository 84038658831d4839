"""Page tables: pages handed out lowest first, all-or-nothing growth, release, block tables."""

from __future__ import annotations

import numpy as np
import pytest

from tensorpress.errors import TensorpressError
from tensorpress.runtime.paged_kv_cache import OutOfKVPagesError, PagedKVCache, pages_for


def test_pages_for_rounds_up():
    assert [pages_for(n, 16) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_sequences_grow_page_by_page_and_map_positions_to_rows():
    cache = PagedKVCache(num_pages=8, page_size=4)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.extend(a, 5)  # 2 pages
    cache.extend(b, 3)  # 1 page
    cache.extend(a, 8)  # still 2 pages
    cache.extend(a, 9)  # third page
    assert cache.pages(a) == [0, 1, 3] and cache.pages(b) == [2]
    assert cache.length(a) == 9 and cache.num_free_pages == 4
    table = cache.block_table([b, a])
    np.testing.assert_array_equal(table, [[2, 0, 0], [0, 1, 3]])
    assert table.dtype == np.int32


def test_running_out_changes_nothing_and_names_the_fix():
    cache = PagedKVCache(num_pages=3, page_size=4)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.extend(a, 8)
    cache.extend(b, 2)
    before = (cache.pages(a), cache.pages(b), cache.num_free_pages, cache.length(b))
    with pytest.raises(OutOfKVPagesError, match="max-total-tokens") as err:
        cache.extend(b, 9)  # needs 2 more pages, 0 free
    assert isinstance(err.value, TensorpressError)
    assert (cache.pages(a), cache.pages(b), cache.num_free_pages, cache.length(b)) == before


def test_released_pages_are_reused_lowest_first():
    cache = PagedKVCache(num_pages=4, page_size=2)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.extend(a, 4)  # pages 0, 1
    cache.extend(b, 4)  # pages 2, 3
    cache.release(a)
    assert cache.num_free_pages == 2
    c = cache.add_sequence()
    cache.extend(c, 3)
    assert cache.pages(c) == [0, 1] and cache.pages(b) == [2, 3]


def test_shrinking_is_refused():
    cache = PagedKVCache(num_pages=2, page_size=2)
    a = cache.add_sequence()
    cache.extend(a, 3)
    with pytest.raises(ValueError):
        cache.extend(a, 2)
