"""Test support for the paged KV kernels: ragged batches over scattered pages, and numpy references of
paged attention (the direct softmax, and the chunked two-stage form the kernels compute)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SLOTS = 8


@dataclass
class PagedBatch:
    """One call's inputs: `pool` [L, P, 2, KVH, PS, D] already holding every token's K/V (appended),
    and the N query tokens with their positions, block-table rows and queries."""

    pool: np.ndarray
    block_table: np.ndarray
    positions: np.ndarray
    seq_slot: np.ndarray
    q: np.ndarray
    layer: int

    def arrays(self):
        return self.q, self.pool, self.positions, self.seq_slot, self.block_table


def paged_batch(rng, heads, kv_heads, head_dim, page_size, lengths, new, dtype="float32", layers=2, layer=1):
    """Sequences of `lengths[i]` tokens (all cached), queried by their last `new[i]` tokens; pages are
    handed out in a shuffled order, and block-table rows end with unused entries (page 0)."""
    pages_each = [-(-n // page_size) for n in lengths]
    width = max(pages_each) + 1
    num_pages = sum(pages_each) + 1
    order = rng.permutation(num_pages)
    block_table = np.zeros((len(lengths), width), np.int32)
    taken = 0
    for s, count in enumerate(pages_each):
        block_table[s, :count] = order[taken : taken + count]
        taken += count
    pool = rng.standard_normal((layers, num_pages, 2, kv_heads, page_size, head_dim)).astype(dtype)
    positions = np.concatenate([np.arange(n - k, n) for n, k in zip(lengths, new)]).astype(np.int32)
    seq_slot = np.repeat(np.arange(len(lengths)), new).astype(np.int32)
    q = rng.standard_normal((len(positions), heads, head_dim)).astype(dtype)
    return PagedBatch(pool, block_table, positions, seq_slot, q, layer)


def gather_kv(batch: PagedBatch, token: int):
    """K and V rows [position + 1, KVH, D] (float64) that query token `token` attends to."""
    page_size = batch.pool.shape[4]
    t = np.arange(batch.positions[token] + 1)
    pages = batch.block_table[batch.seq_slot[token], t // page_size]
    keys = batch.pool[batch.layer, pages, 0, :, t % page_size].astype(np.float64)
    values = batch.pool[batch.layer, pages, 1, :, t % page_size].astype(np.float64)
    return keys, values


def attention_reference(batch: PagedBatch) -> np.ndarray:
    """softmax(q·kᵀ/√D)·v per token and head, causal, GQA, in float64 (the plain definition)."""
    n_tokens, heads, head_dim = batch.q.shape
    group = heads // batch.pool.shape[3]
    out = np.zeros((n_tokens, heads, head_dim))
    for i in range(n_tokens):
        keys, values = gather_kv(batch, i)
        for h in range(heads):
            scores = keys[:, h // group] @ batch.q[i, h].astype(np.float64) / np.sqrt(head_dim)
            w = np.exp(scores - scores.max())
            out[i, h] = (w / w.sum()) @ values[:, h // group]
    return out


def chunked_attention_reference(batch: PagedBatch, chunk: int) -> np.ndarray:
    """The two-stage form of `kv_attention.py`, in float32 with its summation orders: per chunk the max
    m, p = exp(s - m), l = Σp and a = Σ p·v as SLOTS interleaved partial sums; then the merge."""
    n_tokens, heads, head_dim = batch.q.shape
    group = heads // batch.pool.shape[3]
    out = np.zeros((n_tokens, heads, head_dim), np.float32)
    for i in range(n_tokens):
        keys, values = (x.astype(np.float32) for x in gather_kv(batch, i))
        q = batch.q[i].astype(np.float32) * np.float32(1.0 / np.sqrt(head_dim))
        for h in range(heads):
            maxes, sums, accs = [], [], []
            for start in range(0, len(keys), chunk):
                k, v = keys[start : start + chunk, h // group], values[start : start + chunk, h // group]
                s = k @ q[h]
                m = s.max()
                p = np.exp(s - m)
                slots = np.zeros((SLOTS, head_dim), np.float32)
                for t in range(len(p)):
                    slots[t % SLOTS] += p[t] * v[t]
                maxes.append(m)
                sums.append(p.sum())
                accs.append(slots.sum(0))
            big = max(maxes)
            w = np.exp(np.array(maxes) - big)
            out[i, h] = (w[:, None] * np.array(accs)).sum(0) / (w * np.array(sums)).sum()
    return out


def append_reference(pool, block_table, positions, seq_slot, k, v, layer):
    """`pool` with the K/V rows of the tokens written where their positions say."""
    out = pool.copy()
    page_size = pool.shape[4]
    for i, (p, s) in enumerate(zip(positions, seq_slot)):
        page = block_table[s, p // page_size]
        out[layer, page, 0, :, p % page_size] = k[i]
        out[layer, page, 1, :, p % page_size] = v[i]
    return out
