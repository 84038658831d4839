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


def attention_reference(batch: PagedBatch, scores_of=None) -> np.ndarray:
    """softmax(q·kᵀ/√D)·v per token and head, causal, GQA, in float64 (the plain definition); `scores_of`
    (token, head) -> the scores over positions 0..the token's own replaces q·kᵀ/√D where given."""
    n_tokens, heads, head_dim = batch.q.shape
    group = heads // batch.pool.shape[3]
    out = np.zeros((n_tokens, heads, head_dim))
    for i in range(n_tokens):
        keys, values = gather_kv(batch, i)
        for h in range(heads):
            if scores_of is None:
                scores = keys[:, h // group] @ batch.q[i, h].astype(np.float64) / np.sqrt(head_dim)
            else:
                scores = scores_of(i, h).astype(np.float64)
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


def _int8_query_key_rows(fmt_name: str, stored, layer: int, qpage: int, head: int, rows):
    """(codes [R, D] int, a, b) of quantised rows `rows` of quantised page `qpage`: a, b [R, 1] per token
    (int2-oscar) or [1, D] per channel (int2-kitty), float32."""
    from tensorpress.compiler.formats.kv_int2_kitty import NOT_BOOSTED, unpack_2bit

    if fmt_name == "int2-oscar":
        codes, min_scale = stored
        ms = min_scale[layer, qpage, 0, head, rows].astype(np.float32)
        return unpack_2bit(codes[layer, qpage, 0, head, rows]).astype(np.int64), ms[:, 1:], ms[:, :1]
    codes, high, slots, key_ms, _ = stored
    code = unpack_2bit(codes[layer, qpage, 0, head, rows]).astype(np.int64)
    slot = slots[layer, qpage, head].astype(np.int64)
    boosted = slot != NOT_BOOSTED
    high_codes = unpack_2bit(high[layer, qpage, head, rows]).astype(np.int64)
    code[:, boosted] |= high_codes[:, slot[boosted]] << 2
    ms = key_ms[layer, qpage, head].astype(np.float32)
    return code, ms[None, :, 1], ms[None, :, 0]


def int8_query_scores_reference(fmt, batch: PagedBatch, tagged, stored, token: int, head: int) -> np.ndarray:
    """The scores (float32) of query token `token`, head `head`, over positions 0..its own, as the
    int8-query block defines them (`schedules/cpu/int8_query_scores.py`): fp rows q·k, quantised rows the
    integer dot product with q (per token) or q·a (per channel) rounded to int8."""
    page_size, head_dim = batch.pool.shape[4], batch.pool.shape[5]
    group = batch.q.shape[1] // batch.pool.shape[3]
    g = head // group
    quantised_rows = stored[0].shape[4]
    q = batch.q[token, head].astype(np.float32) * np.float32(1.0 / np.sqrt(head_dim))
    t = np.arange(batch.positions[token] + 1)
    entries = tagged[batch.seq_slot[token], t // page_size].astype(np.int64)
    scores = np.zeros(len(t), np.float32)
    for i, (entry, row) in enumerate(zip(entries, t % page_size)):
        if entry >= 0:
            k = batch.pool[batch.layer, entry, 0, g, row].astype(np.float32)
            scores[i] = np.add.accumulate(q * k, dtype=np.float32)[-1]
            continue
        tag = -1 - entry
        qpage, qrow = tag // (quantised_rows // page_size), (tag % (quantised_rows // page_size)) * page_size + row
        code, a, b = _int8_query_key_rows(fmt.name, stored, batch.layer, qpage, g, [qrow])
        if a.shape[1] == 1:  # per token
            w, bias = q, np.add.accumulate(q, dtype=np.float32)[-1] * b[0, 0]
        else:
            w, bias = q * a[0], np.add.accumulate(q * b[0], dtype=np.float32)[-1]
        top = np.abs(w).max()
        sigma = np.float32(top / np.float32(127))
        if a.shape[1] == 1:  # per token: q / σ
            w8 = np.rint(w / sigma).astype(np.int64) if sigma > 0 else np.zeros(head_dim, np.int64)
        else:  # per channel: w · (127 / max), one division a page
            w8 = np.rint(w * (np.float32(127) / top)).astype(np.int64) if top > 0 else np.zeros(head_dim, np.int64)
        isum = np.float32(int(w8 @ code[0]))
        scale = a[0, 0] * sigma if a.shape[1] == 1 else sigma
        scores[i] = isum * np.float32(scale) + np.float32(bias)
    return scores


def int8_query_attention_reference(fmt, batch: PagedBatch, tagged, stored) -> np.ndarray:
    """Attention (float64 softmax and p·v over the values in `batch.pool`) with the int8-query scores."""
    return attention_reference(batch, lambda i, h: int8_query_scores_reference(fmt, batch, tagged, stored, i, h))
