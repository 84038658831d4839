"""When a page-granular KV cache quantises pages and how big its pools are (`runtime/page_quantisation.py`),
and the page tables' second pool (`PagedKVCache.quantise_group`): checked against a brute-force walk
over the pages of a sequence."""

from __future__ import annotations

import pytest

from tensorpress.runtime.page_quantisation import FULL_PRECISION_SEQUENCES, PageQuantisationPolicy
from tensorpress.runtime.paged_kv_cache import OutOfKVPagesError, PagedKVCache

POLICY = PageQuantisationPolicy(page_size=16, sink_tokens=32, window_tokens=128, group_pages=8)
OTHER_POLICIES = [POLICY, PageQuantisationPolicy(16, 16, 32, 2), PageQuantisationPolicy(8, 20, 30, 3)]


def _groups_due_by_walking(policy, length):
    """Groups whose G pages are all past the sink pages and hold only tokens before the window."""
    ps, g, sink = policy.page_size, policy.group_pages, -(-policy.sink_tokens // policy.page_size)
    count = 0
    while True:
        first = sink + count * g
        last_token = (first + g) * ps - 1
        if last_token >= length - policy.window_tokens:
            return count
        count += 1


@pytest.mark.parametrize(
    "policy", [POLICY, PageQuantisationPolicy(16, 16, 32, 2), PageQuantisationPolicy(8, 20, 30, 3)]
)
def test_groups_fall_due_once_all_their_tokens_are_before_the_window(policy):
    for length in range(0, 700):
        assert policy.groups_due(length) == _groups_due_by_walking(policy, length), length
    assert POLICY.groups_due(287) == 0 and POLICY.groups_due(288) == 1  # tokens 32..159 leave at 288


def test_full_precision_pages_stay_within_the_steady_count_between_steps():
    policy = POLICY
    for length in range(1, 3000):
        pages = -(-length // policy.page_size)
        held = pages - policy.groups_due(length) * policy.group_pages
        assert held + 1 <= policy.steady_pages  # +1: the page a decode step takes before quantising
    due = policy.groups_due(2000)
    assert policy.reservation(100, 2000) == (7 + policy.steady_pages, due)  # the prompt's pages, then steady
    assert policy.reservation(1000, 2000) == (63 + policy.steady_pages, due)  # prefilled in one call, in fp
    assert policy.reservation(1000, 2000, slice_tokens=256) == (16 + policy.steady_pages, due)  # in slices
    assert policy.reservation(20, 40) == (3, 0)


def test_pool_sizes_from_tokens_and_from_bytes():
    assert POLICY.pool_pages(1000) == (63, 8)
    assert POLICY.pool_pages(100_000) == (FULL_PRECISION_SEQUENCES * POLICY.steady_pages, 782)
    full_page, quantised_page = 16 * 1024, 128 * 40
    for budget in (10**5, 10**6, 10**8):
        tokens = POLICY.tokens_in(budget, full_page, quantised_page)
        full, quantised = POLICY.pool_pages(tokens)
        assert tokens % 128 == 0
        if tokens > 128:
            assert full * full_page + quantised * quantised_page <= budget
            bigger = POLICY.pool_pages(tokens + 128)
            assert bigger[0] * full_page + bigger[1] * quantised_page > budget


def test_quantised_groups_are_tagged_and_every_page_returns():
    cache = PagedKVCache(num_pages=10, page_size=4, num_quantised_pages=3, group_pages=2)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.extend(a, 20)  # pages 0-4
    cache.extend(b, 8)  # pages 5, 6
    pages, q = cache.quantise_group(a, 1)
    assert (pages, q) == ([1, 2], 0) and cache.pages(a) == [0, -1, -2, 3, 4]
    cache.free_full_precision(pages)
    pages, q = cache.quantise_group(a, 3)
    cache.free_full_precision(pages)
    assert cache.pages(a) == [0, -1, -2, -3, -4] and cache.held(a) == (1, 2) and cache.held(b) == (2, 0)
    assert cache.num_free_pages == 7 and cache.num_free_quantised_pages == 1
    np_table = cache.block_table([b, a])
    assert np_table.tolist() == [[5, 6, 0, 0, 0], [0, -1, -2, -3, -4]]
    with pytest.raises(ValueError, match="no 2 full-precision pages at entry 1"):
        cache.quantise_group(a, 1)
    cache.extend(b, 16)
    cache.free_full_precision(cache.quantise_group(b, 0)[0])
    with pytest.raises(OutOfKVPagesError, match="quantised KV pool is full"):
        cache.quantise_group(b, 2)
    assert cache.pages(b)[2:] == [1, 2]  # the refused group keeps its full-precision pages
    cache.release(a)
    cache.release(b)
    assert cache.num_free_pages == 10 and cache.num_free_quantised_pages == 3
