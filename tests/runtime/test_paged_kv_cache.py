"""Page tables: pages handed out lowest first, all-or-nothing growth, release, block tables."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# ------------------------------------------------------------------ property test at the capacity edge

# One step: (what, which live sequence, pages past exactly filling the pool: -1, 0 or +1, rows short of
# the page end). "grow" aims at the pool's exact capacity, one page under it, or one page over it.
_STEPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "grow", "grow", "release"]), st.integers(0, 7), st.integers(-1, 1), st.integers(0, 3)
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(num_pages=st.integers(1, 6), page_size=st.integers(1, 4), steps=_STEPS)
def test_growth_succeeds_exactly_when_the_free_pages_suffice_and_fails_without_a_trace(num_pages, page_size, steps):
    cache = PagedKVCache(num_pages, page_size)
    live: list[int] = []
    for what, pick, over, short in steps:
        if what == "add" or not live:
            live.append(cache.add_sequence())
            continue
        seq = live[pick % len(live)]
        if what == "release":
            cache.release(seq)
            live.remove(seq)
            continue
        held = len(cache.pages(seq))
        want_pages = held + cache.num_free_pages + over  # exactly all free pages, one fewer, one more
        new_length = max(cache.length(seq), want_pages * page_size - short % page_size)
        missing = pages_for(new_length, page_size) - held
        before = {s: (cache.length(s), cache.pages(s)) for s in live}, cache.num_free_pages
        if missing <= cache.num_free_pages:
            cache.extend(seq, new_length)
            assert cache.length(seq) == new_length and len(cache.pages(seq)) == held + missing
        else:
            with pytest.raises(OutOfKVPagesError):
                cache.extend(seq, new_length)
            assert ({s: (cache.length(s), cache.pages(s)) for s in live}, cache.num_free_pages) == before
        owned = [page for s in live for page in cache.pages(s)]
        assert len(owned) == len(set(owned)) and len(owned) + cache.num_free_pages == num_pages
        assert all(len(cache.pages(s)) == pages_for(cache.length(s), page_size) for s in live)
