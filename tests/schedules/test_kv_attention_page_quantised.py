"""Paged attention over a page-granular cache (int2-kitty): full-precision pages (sink, window) and
quantised pages in one tagged block table, on the CPU against numpy attention over the same cache with
the quantised pages replaced by the format's numpy dequantisation; decode and prefill (query tokens after
quantised pages: a second turn), GQA, and bit-identical reruns."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import tvm
from kv_reference import attention_reference, paged_batch
from tvm.s_tir import dlight as dl

from tensorpress.compiler.formats.kv_int2_kitty import Int2KittyKVCache
from tensorpress.compiler.formats.kv_int2_oscar import Int2OscarKVCache
from tensorpress.schedules.kv_attention import CPU_CHUNK_TOKENS, kv_attention_rules, paged_attention_func


def mixed_cache(fmt, batch, sink_pages: int, window_pages: int, dtype="float32"):
    """Quantise, with the numpy reference, every group of G pages of each sequence past its first
    `sink_pages` pages and before its last `window_pages`: returns the tagged block table and the
    quantised tensors, and rewrites `batch.pool` (what the reference reads) with the dequantised rows."""
    layers, _, _, kv_heads, page_size, head_dim = batch.pool.shape
    group = fmt.group_pages(page_size)
    groups = []  # (sequence, first block-table entry)
    for s in range(len(batch.block_table)):
        used = -(-(int(batch.positions[batch.seq_slot == s].max()) + 1) // page_size)
        first = sink_pages
        while first + group <= used - window_pages:
            groups.append((s, first))
            first += group
    count = len(groups) + 1  # quantised page 0 stays unused: a tag off by one reads zeros
    tensors = fmt.quantised_tensors(layers, kv_heads, head_dim, dtype)
    stored = [np.zeros([count if d == "num_quantised_pages" else d for d in t.shape], t.dtype) for t in tensors]
    tagged = batch.block_table.copy()
    for q, (s, first) in enumerate(groups, start=1):
        fp_pages = batch.block_table[s, first : first + group]
        for layer in range(layers):
            for g in range(kv_heads):
                keys, values = (batch.pool[layer, fp_pages, kv, g].reshape(-1, head_dim) for kv in (0, 1))
                page = fmt.quantize_page(keys, values)
                for array, part in zip(stored, page):
                    if array.shape[2:4] == (2, kv_heads) and part.shape[0] == 2:  # a K/V axis before the head
                        array[layer, q, :, g] = part
                    else:
                        array[layer, q, g] = part
                for kv, rows in enumerate(fmt.dequantize_page(page, dtype)):
                    batch.pool[layer, fp_pages, kv, g] = rows.reshape(group, page_size, head_dim)
        tagged[s, first : first + group] = -1 - (q * group + np.arange(group))
    return tagged, stored, len(groups)


def _build(fmt, heads, kv_heads, head_dim, page_size, phase, defined_for_the_cpu=False):
    """The kernel scheduled and built for the CPU; defined_for_the_cpu: defined under the llvm target too,
    as the compiler defines it for a CPU build (its chunks CPU_CHUNK_TOKENS), else with the default chunks."""
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    with target if defined_for_the_cpu else contextlib.nullcontext():
        func = paged_attention_func(fmt, heads, kv_heads, head_dim, page_size, "float32", phase)
    with target:
        mod = dl.ApplyDefaultSchedule(*kv_attention_rules())(
            tvm.IRModule({phase: func.with_attr("global_symbol", phase)})
        )
        return tvm.compile(mod, target=target)[phase]


def _run(kernel, batch, tagged, stored):
    out = tvm.runtime.tensor(np.full(batch.q.shape, np.nan, batch.q.dtype))
    args = [batch.q, batch.pool, *stored, batch.positions, batch.seq_slot, tagged]
    kernel(*[tvm.runtime.tensor(a) for a in args], batch.layer, out)
    return out.numpy()


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, phase, new",
    [
        (4, 2, 32, "decode", [1, 1, 1, 1]),
        (8, 1, 64, "prefill", [7, 3, 1, 2]),
        (8, 2, 128, "decode", [1, 1, 1, 1]),  # head_dim > 64: the gathered key tile, vectorised over rows
    ],
)
def test_attention_over_full_precision_and_2bit_pages_matches_numpy_over_the_dequantised_cache(
    heads, kv_heads, head_dim, phase, new
):
    """Page size 8, quantised pages of 32 tokens (G = 4), a sink of one page and a window of two: the
    sequences hold 0, 1, 3 and 5 quantised pages, read between their full-precision ones."""
    fmt = Int2KittyKVCache(boost_fraction=0.25, sink=8, window=16, page_tokens=32)
    rng = np.random.default_rng(head_dim)
    batch = paged_batch(rng, heads, kv_heads, head_dim, 8, [20, 61, 130, 190], new)
    batch.pool *= rng.uniform(0.2, 4, head_dim).astype(np.float32)  # uneven channels: the boost matters
    tagged, stored, quantised_pages = mixed_cache(fmt, batch, sink_pages=1, window_pages=2)
    assert quantised_pages == 0 + 1 + 3 + 5 and (tagged < 0).any() and (tagged > 0).any()
    kernel = _build(fmt, heads, kv_heads, head_dim, 8, phase)
    out = _run(kernel, batch, tagged, stored)
    np.testing.assert_allclose(out, attention_reference(batch), rtol=2e-5, atol=2e-5)
    assert np.array_equal(_run(kernel, batch, tagged, stored).view(np.uint32), out.view(np.uint32))


@pytest.mark.parametrize(
    "fmt",
    [
        Int2KittyKVCache(boost_fraction=0.25, sink=16, window=32, page_tokens=64),
        Int2OscarKVCache(sink=16, window=32, page_tokens=16),
    ],
    ids=["int2-kitty", "int2-oscar"],
)
def test_the_cpu_chunks_over_many_2bit_pages_match_numpy_over_the_dequantised_cache(fmt):
    """The CPU's chunks (CPU_CHUNK_TOKENS positions) over contexts of up to 6 chunks of page size 16,
    each chunk mixing quantised pages with the sink's or the window's full-precision ones and ending
    partial (or at one position): the kernel defined and built as the compiler does for the CPU agrees
    with numpy attention over the dequantised cache (G8, head_dim 128: the gathered tiles), reruns
    bit-identical."""
    rng = np.random.default_rng(5)
    batch = paged_batch(rng, 16, 2, 128, 16, [700, 129, 300, 40, 512], [1, 1, 1, 1, 1])
    tagged, stored, quantised_pages = mixed_cache(fmt, batch, sink_pages=1, window_pages=2)
    assert quantised_pages > 0 and (tagged < 0).sum() * 16 > 2 * CPU_CHUNK_TOKENS
    kernel = _build(fmt, 16, 2, 128, 16, "decode", defined_for_the_cpu=True)
    out = _run(kernel, batch, tagged, stored)
    np.testing.assert_allclose(out, attention_reference(batch), rtol=2e-5, atol=2e-5)
    assert np.array_equal(_run(kernel, batch, tagged, stored).view(np.uint32), out.view(np.uint32))
