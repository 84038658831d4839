"""Paged KV cache kernels: append new K/V rows into pages, causal GQA attention over pages.

The page pool is one tensor for all layers, owned by the runtime (`runtime/paged_kv_cache.py`):

    kv_pages[L, P, 2, KVH, PS, D]          (model dtype)

      L    layers               the kernels take `layer` as a scalar argument
      P    pages                symbolic: the runtime picks it (--max-total-tokens)
      2    0 = K, 1 = V
      KVH  key/value heads
      PS   tokens per page      page_size, fixed at compile time
      D    head_dim

    layer l ─┬─ page 0 ─┬─ K ─┬─ kv head 0 ─ [PS rows × D]   row r = token at position page_slot*PS + r
             │          │     └─ kv head 1 ─ [PS rows × D]
             │          └─ V ─── ... same ...
             ├─ page 1 ... (a page holds PS consecutive tokens of one sequence, in every layer)

A sequence s owns the pages `block_table[s, 0..]` (same page ids in every layer); its token at
position t is row t % PS of page block_table[s, t // PS]. The runtime allocates pages before a call,
so the kernels never allocate: they only write the rows they are told to and read rows < position.

Ragged batches: the N tokens of one call are flattened; token n belongs to block-table row
`seq_slot[n]` and sits at absolute position `positions[n]`. Prefill passes several tokens per
sequence, decode one. Attention is causal: token n attends to positions 0..positions[n] of its
sequence, i.e. to everything cached before the call plus the tokens of this call up to itself (the
append runs first). GQA: query head h reads kv head h // (H // KVH).

Each output row is computed by one thread in a fixed order (online softmax over positions in increasing
order, fp32 accumulation, q·k as 8 interleaved partial sums), so results are deterministic run to run.

Kernels (PrimFunc attribute `tensorpress.kernel` says which; the rules at the bottom schedule them):
    kv_append           (kv_pages, k[N,KVH,D], v[N,KVH,D], positions[N], seq_slot[N], block_table[B,M], layer)
                        writes kv_pages in place (Relax `call_tir_inplace`)
    paged_attention     (q[N,H,D], kv_pages, positions[N], seq_slot[N], block_table[B,M], layer) -> out[N,H,D]
                        one definition; `phase` ("prefill" or "decode") only names it, so each phase can
                        get its own schedule
"""

from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.script import tirx as T
from tvm.target import Target

KERNEL_ATTR = "tensorpress.kernel"
APPEND_KERNEL = "kv_append"
ATTENTION_KERNEL = "paged_attention"
PHASE_ATTR = "tensorpress.kv_phase"

# AnnotateTIROpPattern leaves functions that already carry a pattern alone; kOpaque (8) keeps FuseOps
# from merging our kernels with neighbours (which would hide them from the rules below).
_OPAQUE = 8
_NEG_BIG = -3.0e38  # initial running max: finite, so exp(m_old - m_new) is 0, never NaN


def kv_append_func(num_kv_heads: int, head_dim: int, page_size: int, dtype: str) -> tirx.PrimFunc:
    """Append the K and V rows of N tokens to their pages (in place on `kv_pages`)."""
    KVH, D, PS = num_kv_heads, head_dim, page_size

    @T.prim_func(private=True, s_tir=True)
    def kv_append(
        var_pages: T.handle,
        var_k: T.handle,
        var_v: T.handle,
        var_positions: T.handle,
        var_seq_slot: T.handle,
        var_block_table: T.handle,
        layer: T.int64,
    ):
        T.func_attr({"tirx.noalias": True, KERNEL_ATTR: APPEND_KERNEL, "op_pattern": _OPAQUE})
        L, P, N, B, M = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        pages = T.match_buffer(var_pages, (L, P, 2, KVH, PS, D), dtype)
        k = T.match_buffer(var_k, (N, KVH, D), dtype)
        v = T.match_buffer(var_v, (N, KVH, D), dtype)
        positions = T.match_buffer(var_positions, (N,), "int32")
        seq_slot = T.match_buffer(var_seq_slot, (N,), "int32")
        block_table = T.match_buffer(var_block_table, (B, M), "int32")
        for n, g, d in T.grid(N, KVH, D):
            with T.sblock("append"):
                vn, vg, vd = T.axis.remap("SSS", [n, g, d])
                T.reads(positions[vn], seq_slot[vn], block_table[seq_slot[vn], 0:M], k[vn, vg, vd], v[vn, vg, vd])
                T.writes(pages[layer, 0:P, 0:2, vg, 0:PS, vd])
                page: T.let[T.int32] = block_table[seq_slot[vn], positions[vn] // PS]
                row: T.let[T.int32] = positions[vn] % PS
                pages[layer, page, 0, vg, row, vd] = k[vn, vg, vd]
                pages[layer, page, 1, vg, row, vd] = v[vn, vg, vd]

    return kv_append


def paged_attention_func(
    num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: str, phase: str
) -> tirx.PrimFunc:
    """Causal GQA attention of N query tokens over their sequences' pages; out = softmax(q·Kᵀ/√D)·V."""
    H, KVH, D, PS = num_q_heads, num_kv_heads, head_dim, page_size
    group = H // KVH
    scale = 1.0 / math.sqrt(D)
    LANES = 8 if D % 8 == 0 else 1

    @T.prim_func(private=True, s_tir=True)
    def paged_attention(
        var_q: T.handle,
        var_pages: T.handle,
        var_positions: T.handle,
        var_seq_slot: T.handle,
        var_block_table: T.handle,
        layer: T.int64,
        var_out: T.handle,
    ):
        T.func_attr({"tirx.noalias": True, KERNEL_ATTR: ATTENTION_KERNEL, PHASE_ATTR: phase, "op_pattern": _OPAQUE})
        L, P, N, B, M = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (N, H, D), dtype)
        pages = T.match_buffer(var_pages, (L, P, 2, KVH, PS, D), dtype)
        positions = T.match_buffer(var_positions, (N,), "int32")
        seq_slot = T.match_buffer(var_seq_slot, (N,), "int32")
        block_table = T.match_buffer(var_block_table, (B, M), "int32")
        out = T.match_buffer(var_out, (N, H, D), dtype)
        for n, h in T.grid(N, H):
            with T.sblock("attention"):
                vn, vh = T.axis.remap("SS", [n, h])
                T.reads(
                    q[vn, vh, 0:D],
                    positions[vn],
                    seq_slot[vn],
                    block_table[seq_slot[vn], 0:M],
                    pages[layer, 0:P, 0:2, vh // group, 0:PS, 0:D],
                )
                T.writes(out[vn, vh, 0:D])
                q_f32 = T.sblock_alloc_buffer((D,), "float32", scope="local")
                acc = T.sblock_alloc_buffer((D,), "float32", scope="local")
                # running max, running sum of exp, current score, rescale factor of the old state
                m = T.sblock_alloc_buffer((1,), "float32", scope="local")
                denom = T.sblock_alloc_buffer((1,), "float32", scope="local")
                score = T.sblock_alloc_buffer((1,), "float32", scope="local")
                partial = T.sblock_alloc_buffer((LANES,), "float32", scope="local")
                m_new = T.sblock_alloc_buffer((1,), "float32", scope="local")
                slot: T.let[T.int32] = seq_slot[vn]
                for d in T.serial(D):
                    q_f32[d] = T.Cast("float32", q[vn, vh, d]) * T.float32(scale)
                    acc[d] = T.float32(0)
                m[0] = T.float32(_NEG_BIG)
                denom[0] = T.float32(0)
                for t in T.serial(positions[vn] + 1):
                    page: T.let[T.int32] = block_table[slot, t // PS]
                    row: T.let[T.int32] = t % PS
                    # q·k in LANES interleaved partial sums (a fixed order; vector lanes on CPUs)
                    for lane in T.serial(LANES):
                        partial[lane] = T.float32(0)
                    for j, lane in T.grid(D // LANES, LANES):
                        k_d = T.Cast("float32", pages[layer, page, 0, vh // group, row, j * LANES + lane])
                        partial[lane] = partial[lane] + q_f32[j * LANES + lane] * k_d
                    score[0] = T.float32(0)
                    for lane in T.serial(LANES):
                        score[0] = score[0] + partial[lane]
                    m_new[0] = T.max(m[0], score[0])
                    # reuse `score` as p = exp(s - m_new) and `m` as alpha = exp(m_old - m_new)
                    score[0] = T.exp(score[0] - m_new[0])
                    m[0] = T.exp(m[0] - m_new[0])
                    denom[0] = denom[0] * m[0] + score[0]
                    for d in T.serial(D):
                        v_d = T.Cast("float32", pages[layer, page, 1, vh // group, row, d])
                        acc[d] = acc[d] * m[0] + score[0] * v_d
                    m[0] = m_new[0]
                for d in T.serial(D):
                    out[vn, vh, d] = T.Cast(dtype, acc[d] / denom[0])

    return paged_attention


# ---------------------------------------------------------------------------------------------- rules


def _kernel_name(func: tirx.PrimFunc) -> str | None:
    if not isinstance(func, tirx.PrimFunc) or func.attrs is None:
        return None
    name = func.attrs.get(KERNEL_ATTR)
    return str(name) if name is not None else None


class KVAttentionCPU(dl.ScheduleRule):
    """llvm: one parallel task per (token, query head) for attention, per (token, kv head) for append.

    The per-position loops inside a task are serial (online softmax); LLVM vectorises the D loops.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        kernel = _kernel_name(func)
        if kernel not in (APPEND_KERNEL, ATTENTION_KERNEL) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        if kernel == APPEND_KERNEL:
            n, g, d = sch.get_loops(sch.get_sblock("append"))
            sch.parallel(sch.fuse(n, g))
            sch.vectorize(d)
        else:
            n, h = sch.get_loops(sch.get_sblock("attention"))
            sch.parallel(sch.fuse(n, h))
        return sch


class KVAttentionCUDA(dl.ScheduleRule):
    """cuda: one thread per (token, query head) for attention, per element for append.

    Correct and simple (dlight-fallback-like); the fast version (a warp per head, pages staged in
    shared memory, split-K over long contexts with a deterministic merge) comes later.
    """

    threads_per_block = 64

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        kernel = _kernel_name(func)
        if kernel not in (APPEND_KERNEL, ATTENTION_KERNEL) or target.kind.name != "cuda":
            return None
        sch = s_tir.Schedule(func)
        if kernel == APPEND_KERNEL:
            loops = sch.get_loops(sch.get_sblock("append"))
            bx, tx = sch.split(sch.fuse(*loops), [None, 128])
        else:
            loops = sch.get_loops(sch.get_sblock("attention"))
            bx, tx = sch.split(sch.fuse(*loops), [None, self.threads_per_block])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        return sch


def kv_attention_rules() -> list[dl.ScheduleRule]:
    """The rules for the kernels of this file (both targets; each says None for the other)."""
    return [KVAttentionCPU(), KVAttentionCUDA()]
