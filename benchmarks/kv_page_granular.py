"""Page-granular KV caches (int2-kitty, int2-oscar) for the attention benchmarks, in numpy: the pools and the tagged
block table that the runtime leaves after B sequences of T tokens (`runtime/page_quantisation.py`):
each sequence's sink pages and its last window (+ the group still waiting) in full precision, the
groups of G pages before the window in quantised pages (`compiler/formats/kv_page_quantised.py`).

    from_dense(fmt, k, v, page_size)     quantised by the format's numpy reference from dense K, V
                                         [B, KVH, T, D]: the arrays, the table, and the dense K, V the
                                         kernel must read (quantised groups dequantised): correctness
    random_cache(fmt, ..., rng)          random stored values (the time does not depend on them): timing
"""

from __future__ import annotations

import numpy as np

NOT_BOOSTED = 255


def layout(fmt, page_size: int, batch: int, context: int) -> tuple[np.ndarray, int, list[tuple[int, int]]]:
    """(tagged table [B, T/PS], full-precision pages, [(sequence, first entry) of each quantised page in
    order]); full-precision pages are numbered in table order, quantised pages in list order."""
    from tensorpress.runtime.page_quantisation import PageQuantisationPolicy

    policy = PageQuantisationPolicy(page_size, fmt.sink, fmt.window, fmt.group_pages(page_size))
    per_seq, group, due = -(-context // page_size), policy.group_pages, policy.groups_due(context)
    table = np.zeros((batch, per_seq), np.int32)
    full, groups = 0, []
    for b in range(batch):
        for i in range(per_seq):
            g = (i - policy.sink_pages) // group
            if i >= policy.sink_pages and g < due:
                table[b, i] = -1 - ((len(groups) + g) * group + (i - policy.sink_pages) % group)
            else:
                table[b, i] = full
                full += 1
        groups += [(b, policy.first_page_of_group(g)) for g in range(due)]
    return table, full, groups


def _empty(fmt, full: int, quantised: int, kv_heads: int, head_dim: int, page_size: int, dtype: str):
    sizes = {"num_pages": max(full, 1), "num_quantised_pages": max(quantised, 1)}
    return [
        np.zeros([sizes.get(d, d) for d in t.shape], t.dtype)  # type: ignore[call-overload]
        for t in fmt.cache_tensors(1, kv_heads, page_size, head_dim, dtype)
    ]


def kv_bytes(fmt, arrays, table: np.ndarray, quantised: int) -> int:
    """Bytes one decode step reads: the full-precision pages of the table and its quantised pages."""
    full_page = arrays[0][0, 0].nbytes
    quantised_page = sum(a[0, 0].nbytes for a in arrays[1:])
    return int((table >= 0).sum()) * full_page + quantised * quantised_page


def from_dense(fmt, k: np.ndarray, v: np.ndarray, page_size: int, dtype: str = "float16"):
    """(arrays, table, k_read, v_read) of dense K, V [B, KVH, T, D] (T a multiple of the page size)."""
    batch, kv_heads, context, head_dim = k.shape
    table, full, groups = layout(fmt, page_size, batch, context)
    arrays = _empty(fmt, full, len(groups), kv_heads, head_dim, page_size, dtype)
    k_read, v_read = k.astype(dtype), v.astype(dtype)
    for b in range(batch):
        for i, entry in enumerate(table[b]):
            if entry >= 0:
                rows = slice(i * page_size, (i + 1) * page_size)
                arrays[0][0, entry, 0], arrays[0][0, entry, 1] = k_read[b, :, rows], v_read[b, :, rows]
    tokens = fmt.page_tokens
    for q, (b, first) in enumerate(groups):
        rows = slice(first * page_size, first * page_size + tokens)
        for g in range(kv_heads):
            page = fmt.quantize_page(k_read[b, g, rows], v_read[b, g, rows])
            for array, part in zip(arrays[1:], page):
                if array.shape[2:4] == (2, kv_heads) and part.shape[0] == 2:  # a K/V axis before the head
                    array[0, q, :, g] = part
                else:
                    array[0, q, g] = part
            k_read[b, g, rows], v_read[b, g, rows] = fmt.dequantize_page(page, dtype)
    return arrays, table, k_read, v_read


def random_cache(fmt, batch: int, context: int, kv_heads: int, head_dim: int, page_size: int, rng, dtype: str):
    """(arrays, table, KV bytes one step reads) with random contents: full-precision rows N(0, 1); codes
    uniform; slot maps of the format's boosted count; (min, scale) as 2-bit grids of N(0, 1) data."""
    table, full, groups = layout(fmt, page_size, batch, context)
    arrays = _empty(fmt, full, len(groups), kv_heads, head_dim, page_size, dtype)
    arrays[0][...] = rng.standard_normal(arrays[0].shape, dtype=np.float32)
    boosted = fmt.boosted(head_dim) if hasattr(fmt, "boosted") else 0  # int2-kitty's 4-bit key channels
    for t, array in zip(fmt.cache_tensors(1, kv_heads, page_size, head_dim, dtype)[1:], arrays[1:]):
        if t.name == "kv_q_key_slot":  # B random channels per (page, head), slots in channel order
            maps = array.reshape(-1, head_dim)
            chosen = np.sort(np.argsort(rng.random(maps.shape), axis=1)[:, :boosted], axis=1)
            maps[...] = NOT_BOOSTED
            np.put_along_axis(maps, chosen, np.arange(boosted, dtype=np.uint8)[None, :], axis=1)
        elif array.dtype == np.uint8:
            array[...] = rng.integers(0, 256, size=array.shape, dtype=np.uint8)
        else:
            array[..., 0] = rng.uniform(-3.0, -2.0, size=array.shape[:-1])
            array[..., 1] = rng.uniform(1.3, 1.6, size=array.shape[:-1])
    return arrays, table, kv_bytes(fmt, arrays, table, len(groups))
