"""The KV cache's device tensors: what the manifest lists, how many pages they get, and allocating them.

The decoder section of a manifest lists the cache tensors the compiled functions take (the KV format
chose them at compile time; the runtime never knows the format), each page-major with the page count
left as "num_pages", and the bytes one token takes over all of them:

    "cache_tensors": [{"name": "kv_codes", "shape": [L, "num_pages", 2, KVH, PS, D], "dtype": "int8"},
                      {"name": "kv_scales", "shape": [L, "num_pages", 2, KVH, PS], "dtype": "float32"}],
    "bytes_per_token": 576

The pool gets `max_total_tokens` tokens' worth of pages (default 4096), or the share `memory_fraction`
of the device's free memory, sized by bytes per token; it is refused in one sentence when it cannot fit.
Which pages hold which sequence's tokens is `paged_kv_cache.py`.

A page-granular cache (the section has "page_quantisation") lists tensors of two pools, full-precision
pages ("num_pages") and quantised ones ("num_quantised_pages"); `pool_page_counts` sizes both
(`page_quantisation.py`) and `allocate_pool` takes the counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from tensorpress.errors import InputError
from tensorpress.runtime.page_quantisation import PageQuantisationPolicy
from tensorpress.runtime.paged_kv_cache import pages_for

DEFAULT_MAX_TOTAL_TOKENS = 4096
NUM_PAGES = "num_pages"
NUM_QUANTISED_PAGES = "num_quantised_pages"


def cache_tensors_of(section: dict[str, Any]) -> list[dict[str, Any]]:
    """The KV cache tensors a decoder section lists ({name, shape with "num_pages", dtype}, in the
    compiled functions' order); artifacts from before the list have one, cache_shape / cache_dtype."""
    if "cache_tensors" in section:
        return list(section["cache_tensors"])
    return [{"name": "kv_pages", "shape": section["cache_shape"], "dtype": section["cache_dtype"]}]


def bytes_per_page(section: dict[str, Any]) -> int:
    """Bytes of one page of every cache tensor: the manifest's bytes per token x page size."""
    page_size = int(section["page_size"])
    if "bytes_per_token" in section:
        return int(section["bytes_per_token"]) * page_size
    return sum(
        int(np.prod([int(d) for d in t["shape"] if d != NUM_PAGES])) * np.dtype(t["dtype"]).itemsize
        for t in cache_tensors_of(section)
    )


def page_bytes(section: dict[str, Any], pool: str) -> int:
    """Bytes of one page of the tensors of `pool` ("num_pages" or "num_quantised_pages")."""
    return sum(
        int(np.prod([int(d) for d in t["shape"] if d != pool])) * np.dtype(t["dtype"]).itemsize
        for t in cache_tensors_of(section)
        if pool in t["shape"]
    )


def pool_page_counts(
    section: dict[str, Any],
    max_total_tokens: int | None,
    memory_fraction: float | None,
    free_memory_bytes: Callable[[], int],
) -> dict[str, int]:
    """Pages of each pool ({"num_pages": n} for a per-row cache; both pools for a page-granular one)."""
    policy = PageQuantisationPolicy.from_section(section)
    if policy is None:
        return {NUM_PAGES: pool_pages(section, max_total_tokens, memory_fraction, free_memory_bytes)}
    _check_sizing(max_total_tokens, memory_fraction)
    if memory_fraction is not None:
        budget = int(free_memory_bytes() * memory_fraction)
        tokens = policy.tokens_in(budget, page_bytes(section, NUM_PAGES), page_bytes(section, NUM_QUANTISED_PAGES))
    else:
        tokens = DEFAULT_MAX_TOTAL_TOKENS if max_total_tokens is None else int(max_total_tokens)
    full, quantised = policy.pool_pages(tokens)
    return {NUM_PAGES: full, NUM_QUANTISED_PAGES: quantised}


def _check_sizing(max_total_tokens: int | None, memory_fraction: float | None) -> None:
    if max_total_tokens is not None and memory_fraction is not None:
        raise InputError("give either max_total_tokens or memory_fraction for the KV cache, not both.")
    if memory_fraction is not None and not 0.0 < memory_fraction <= 1.0:
        raise InputError(f"memory_fraction must be in (0, 1], got {memory_fraction}.")
    if max_total_tokens is not None and int(max_total_tokens) < 1:
        raise InputError(f"max_total_tokens must be at least 1, got {max_total_tokens}.")


def pool_pages(
    section: dict[str, Any],
    max_total_tokens: int | None,
    memory_fraction: float | None,
    free_memory_bytes: Callable[[], int],
) -> int:
    """Pages of the pool: enough for `max_total_tokens` (default 4096), or `memory_fraction` of the
    device's free memory (`free_memory_bytes()`), never both."""
    if max_total_tokens is not None and memory_fraction is not None:
        raise InputError("give either max_total_tokens or memory_fraction for the KV cache, not both.")
    if memory_fraction is not None:
        if not 0.0 < memory_fraction <= 1.0:
            raise InputError(f"memory_fraction must be in (0, 1], got {memory_fraction}.")
        return max(1, int(free_memory_bytes() * memory_fraction) // bytes_per_page(section))
    tokens = DEFAULT_MAX_TOTAL_TOKENS if max_total_tokens is None else int(max_total_tokens)
    if tokens < 1:
        raise InputError(f"max_total_tokens must be at least 1, got {tokens}.")
    return pages_for(tokens, int(section["page_size"]))


def allocate_pool(
    section: dict[str, Any], num_pages: int | dict[str, int], empty: Callable[[list[int], str], Any], free_bytes: int
) -> list[Any]:
    """The cache tensors for `num_pages` pages (or the pages of each pool, `pool_page_counts`;
    `empty(shape, dtype)` makes one on the device), refused in one sentence when they cannot fit
    `free_bytes` (checked first: on the CPU an oversized allocation may succeed and kill the process later)."""
    counts = num_pages if isinstance(num_pages, dict) else {NUM_PAGES: num_pages}
    policy = PageQuantisationPolicy.from_section(section)
    if policy is None:
        need = counts[NUM_PAGES] * bytes_per_page(section)
        tokens = counts[NUM_PAGES] * int(section["page_size"])
    else:
        need = sum(count * page_bytes(section, pool) for pool, count in counts.items())
        tokens = counts.get(NUM_QUANTISED_PAGES, 0) * policy.group_pages * policy.page_size
    advice = "lower max_total_tokens (--max-total-tokens) or size the pool with memory_fraction."
    if need > free_bytes:
        raise InputError(
            f"a KV cache of {tokens} tokens needs {need / 2**30:.2f} GiB but the device has "
            f"{free_bytes / 2**30:.2f} GiB free; {advice}"
        )
    try:
        return [
            empty([counts[dim] if dim in counts else int(dim) for dim in t["shape"]], t["dtype"])
            for t in cache_tensors_of(section)
        ]
    except (MemoryError, RuntimeError) as err:  # std::bad_alloc, cudaErrorMemoryAllocation
        raise InputError(
            f"the KV cache of {tokens} tokens ({need / 2**30:.2f} GiB) could not be allocated; {advice}"
        ) from err
