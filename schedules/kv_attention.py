"""Paged KV cache kernels: append new K/V rows into pages, causal GQA attention over pages.

The cache is the tensors of a KV-cache format (`compiler/formats/kv_cache.py`, passed in as
`kv_cache`), each for all layers and owned by the runtime (`runtime/paged_kv_cache.py`); the kernels
take the format's append and its one page read. The unquantised format's single tensor:

    kv_pages[L, P, 2, KVH, PS, D]          (model dtype; int8 keeps kv_codes[.., D] + kv_scales[..])

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

Attention is computed in chunks of `chunk` consecutive positions (flash-decoding), in two stages:

    stage 1, for each (token n, kv head g, chunk c) and each query head h of g's group:
        s_t = q_h · k_t / √D                      t in the chunk (q·k summed over D in order)
        m_c = max s_t,  p_t = exp(s_t - m_c)      over the positions t <= positions[n] (p_t = 0 after)
        l_c = Σ_t p_t,  a_c = Σ_t p_t v_t         a_c as SLOTS interleaved partial sums, then summed
    stage 2 (merge), for each (token n, query head h), over its chunks c (those with c·chunk <= position):
        M = max_c m_c,  out = Σ_c e^(m_c - M) a_c / Σ_c e^(m_c - M) l_c     (chunks in increasing order)

Every sum has one fixed order and no atomics, so results are bit-identical run to run. All of it is
fp32; q is scaled by 1/√D before the dot products. The stage-1 values of all chunks (`chunk_max`,
`chunk_sum`, `chunk_acc`) live in a workspace the kernel allocates itself (TVMBackendAllocWorkspace).

Kernels (PrimFunc attribute `tensorpress.kernel` says which; the rules at the bottom schedule them):
    kv_append           (*cache, k[N,KVH,D], v[N,KVH,D], positions[N], seq_slot[N], block_table[B,M], layer)
                        writes the cache in place (Relax `call_tir_inplace`)
    kv_quantize_pages   (*cache, src[K,G], dst[K]): page-granular formats only (`compiler/formats/
                        kv_page_quantised.py`): G fp pages -> one quantised page, all layers, in place
    paged_attention     (q[N,H,D], *cache, positions[N], seq_slot[N], block_table[B,M], layer) -> out[N,H,D]
                        one definition; `phase` ("prefill" or "decode") only names it, so each phase can
                        get its own schedule. Schedules: `kv_attention_cpu.py`, `kv_attention_cuda.py`.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir import Range
from tvm.s_tir import dlight as dl
from tvm.s_tir import stmt as sblock_stmt
from tvm.script import tirx as T
from tvm.target import Target

from tensorpress.schedules.cpu.int8_query_scores import (
    high_packed_length,
    int8_query_scores,
    packed_length,
    prepare_query,
)

KERNEL_ATTR = "tensorpress.kernel"
APPEND_KERNEL = "kv_append"
ATTENTION_KERNEL = "paged_attention"
QUANTIZE_KERNEL = "kv_quantize_pages"  # page-granular formats: fp pages -> a quantised page
PHASE_ATTR = "tensorpress.kv_phase"
CHUNK_ATTR = "tensorpress.kv_chunk"

AVX2_CPUS = ("x86-64-v3", "x86-64-v4")  # the CPU levels of compiler/targets.py: all have AVX2
SLOTS = 8  # a_c is summed as SLOTS interleaved partial sums (one per thread row on the GPU)


CPU_CHUNK_TOKENS = 128  # llvm: few chunk partials (measured at 32k context, see chunk_tokens)


def chunk_tokens(num_q_heads: int, num_kv_heads: int, target_kind: str | None = None) -> int:
    """Positions per chunk for a build for `target_kind` (a TVM target kind; None: the kind of the current
    target, `with target:`, and cuda's chunks when there is none).

    cuda: 64 (enough CTAs at batch 1: 32 kv heads x 2048/64, few partials), or 32 when a kv head serves
    more than 4 query heads (the GPU's per-chunk p·V sums then fit in shared memory in one pass; see
    `kv_attention_cuda.pv_plan`). llvm: CPU_CHUNK_TOKENS whatever the group: a chunk's partials (D floats
    per query head) are written and read back by the merge, and each chunk costs a task's set-up and a sum
    of its slots. At 32k context, G8, batch 1, one thread (CPU time, in turns), chunks of 32 -> 128 took
    fp32 44.1 -> 40.0 ms, int2-kitty 21.0 -> 17.9, int2-oscar 20.7 -> 16.9; at batch 8 and 2 threads
    256 was no faster and 512 slower. 128 positions still give a 1k context 8 tasks per kv head and token.
    """
    if target_kind is None:
        current = Target.current(allow_none=True)
        target_kind = current.kind.name if current is not None else "cuda"
    if target_kind == "llvm":
        return CPU_CHUNK_TOKENS
    return 64 if num_q_heads // num_kv_heads <= 4 else 32


# AnnotateTIROpPattern leaves functions that already carry a pattern alone; kOpaque (8) keeps FuseOps
# from merging our kernels with neighbours (which would hide them from the rules below).
_OPAQUE = 8


class KVCacheLayout(Protocol):
    """What the kernels of this file ask of a KV-cache format (`compiler/formats/kv_cache.py`; passed
    in, never imported: schedules sit below the compiler)."""

    def cache_tensors(
        self, num_layers: int | str, kv_heads: int, page_size: int, head_dim: int, model_dtype: str
    ) -> list[Any]: ...

    def append_func(self, kv_heads: int, head_dim: int, page_size: int, model_dtype: str) -> tirx.PrimFunc: ...

    def read(self, cache, layer, page, kv: int, head, row, d, dtype: str) -> tirx.PrimExpr: ...


def kv_append_func(
    kv_cache: KVCacheLayout, num_kv_heads: int, head_dim: int, page_size: int, dtype: str
) -> tirx.PrimFunc:
    """Append the K and V rows of N tokens to their pages (in place on the cache tensors): the format's
    append (quantise on write), marked as this file's append kernel."""
    func = kv_cache.append_func(num_kv_heads, head_dim, page_size, dtype)
    return func.with_attrs({KERNEL_ATTR: APPEND_KERNEL, "op_pattern": _OPAQUE})


def kv_quantize_pages_func(
    kv_cache: Any, num_kv_heads: int, head_dim: int, page_size: int, dtype: str
) -> tirx.PrimFunc:
    """The page-granular format's quantise kernel, marked as this file's kv_quantize_pages."""
    func = kv_cache.quantize_pages_func(num_kv_heads, head_dim, page_size, dtype)
    return func.with_attrs({KERNEL_ATTR: QUANTIZE_KERNEL, "op_pattern": _OPAQUE})


def _cache_buffers(kv_cache: KVCacheLayout, kv_heads, head_dim, page_size, dtype) -> list[tirx.Buffer]:
    """The cache tensors as kernel buffers, layers and pages symbolic (named without the `kv_` prefix;
    a page-granular format's quantised pool has its own page count)."""
    dims = {
        "num_layers": tirx.Var("L", "int64"),
        "num_pages": tirx.Var("P", "int64"),
        "num_quantised_pages": tirx.Var("Q", "int64"),
    }
    buffers = []
    for tensor in kv_cache.cache_tensors("num_layers", kv_heads, page_size, head_dim, dtype):
        # sizes are int64 like the other shapes; the K/V axis (2) stays the int32 literal it always was
        shape = [
            dims[d] if isinstance(d, str) else tirx.IntImm("int32" if axis == 2 else "int64", d)
            for axis, d in enumerate(tensor.shape)
        ]
        buffers.append(tirx.decl_buffer(shape, tensor.dtype, tensor.name.removeprefix("kv_")))
    return buffers


def row_blocks(sch: s_tir.Schedule) -> list[tuple[Any, int]]:
    """The append kernel's blocks other than "append" (a format's per-row steps), each with the number
    of its leading loops that are spatial (the rest, reductions included, run in one thread)."""
    found = []
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        stmt = sch.get(block)
        if stmt.name_hint == "append":
            continue
        spatial = sum(1 for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar)
        found.append((block, spatial))
    return found


def cache_params(func: tirx.PrimFunc) -> list[tirx.Buffer]:
    """The cache buffers of a kernel of this file: the params before `k` (append) or after `q`."""
    names = [p.name for p in func.params]
    if kernel_name(func) == APPEND_KERNEL:
        return list(func.params[: names.index("k")])
    return list(func.params[1 : names.index("positions")])


def paged_attention_func(
    kv_cache: KVCacheLayout,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: str,
    phase: str,
    chunk: int | None = None,
    int8_query: bool | None = None,
) -> tirx.PrimFunc:
    """Causal GQA attention of N query tokens over their sequences' pages; out = softmax(q·Kᵀ/√D)·V,
    in chunks of `chunk` positions (a multiple of SLOTS; default `chunk_tokens` for the current target,
    so a build for the CPU defines fewer, longer chunks than one for CUDA) merged in order.

    Blocks, in order (stage 1 shares the loops n, g, c; j = query head in the group, t = position in
    the chunk):  q_scaled, keys, score, chunk_max, prob, chunk_sum, values, slot_acc, chunk_acc |
    merged_max, merged_sum, merged_acc, out.  `keys`/`values` gather the chunk's rows from the pages
    through the format's one page read (`kv_cache.read`, dequantising to `dtype`); a position past the
    token's own is clamped to it (so every read is in bounds) and masked to p = 0. The cache tensors
    are the params after q, in the format's order.

    int8_query (None: the format's `int8_query` option on an llvm target, where the format gives its key
    planes and the shape fits): `keys` and `score` become one block per task whose scores over quantised
    rows are integer dot products with q rounded to int8 (`cpu/int8_query_scores.py` defines them).
    """
    chunk = chunk or chunk_tokens(num_q_heads, num_kv_heads)
    if chunk % SLOTS:
        raise ValueError(f"chunk must be a multiple of {SLOTS}, got {chunk}")
    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731 - indices are int64, like the symbolic shapes
    group = num_q_heads // num_kv_heads
    H, KVH, D, PS, G = i64(num_q_heads), i64(num_kv_heads), i64(head_dim), i64(page_size), i64(group)
    CH, S, STEPS = i64(chunk), i64(SLOTS), i64(chunk // SLOTS)
    scale = 1.0 / math.sqrt(head_dim)
    f32_min = T.min_value("float32")  # identity of max (what TVM's reducers expect)
    cache = _cache_buffers(kv_cache, num_kv_heads, head_dim, page_size, dtype)
    int8_keys = _int8_query_keys(kv_cache, head_dim, page_size, int8_query)
    int8_scores, page_weights = (
        int8_query_scores(int8_keys, cache, group, head_dim, page_size, chunk)
        if int8_keys is not None
        else (None, None)
    )
    # per-channel key scales: w8, σ, B of each quantised page, one slot per quantised page of a sequence
    GP = int(cache[1].shape[4]) // page_size if int8_keys is not None else 1
    HCP = high_packed_length(int8_keys.high_count) if int8_keys is not None else 4
    DP = packed_length(head_dim)  # the query's packed positions (int8-query: whole chunks of 128)
    prepare = prepare_query(head_dim)

    def page_row(layer, kv: int, n, g, c, t, d, positions, seq_slot, block_table):
        """Element d of the row at chunk position (c, t) of token n's sequence, kv head g."""
        position = T.min(c * CH + t, T.Cast("int64", positions[n]))
        page = block_table[seq_slot[n], position // PS]
        return kv_cache.read(cache, layer, page, kv, g, position % PS, d, dtype)

    # parsed before the cache buffers it reads are its params (added below): checked once rebuilt
    @T.prim_func(private=True, s_tir=True, check_well_formed=False)
    def paged_attention(
        var_q: T.handle,
        var_positions: T.handle,
        var_seq_slot: T.handle,
        var_block_table: T.handle,
        layer: T.int64,
        var_out: T.handle,
    ):
        T.func_attr(
            {
                "tirx.noalias": True,
                KERNEL_ATTR: ATTENTION_KERNEL,
                PHASE_ATTR: phase,
                CHUNK_ATTR: chunk,
                "op_pattern": _OPAQUE,
            }
        )
        N, B, M = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (N, H, D), dtype)
        positions = T.match_buffer(var_positions, (N,), "int32")
        seq_slot = T.match_buffer(var_seq_slot, (N,), "int32")
        block_table = T.match_buffer(var_block_table, (B, M), "int32")
        out = T.match_buffer(var_out, (N, H, D), dtype)
        with T.sblock("root"):
            # C = number of chunks that cover the block table: (M * PS + CH - 1) // CH
            q_scaled = T.sblock_alloc_buffer((N, H, D), "float32")
            if int8_scores is None:
                keys = T.sblock_alloc_buffer((N, KVH, (M * PS + CH - 1) // CH, CH, D), dtype)
            else:
                q_perm = T.sblock_alloc_buffer((N, H, DP), "float32")
                q_codes = T.sblock_alloc_buffer((N, H, DP), "int8")
                q_sigma = T.sblock_alloc_buffer((N, H), "float32")
                q_total = T.sblock_alloc_buffer((N, H), "float32")
                for n, h in T.grid(N, H):
                    with T.sblock("q_prepared"):
                        vn, vh = T.axis.remap("SS", [n, h])
                        T.reads(q[vn, vh, 0:D])
                        T.writes(q_perm[vn, vh, 0:DP], q_codes[vn, vh, 0:DP], q_sigma[vn, vh], q_total[vn, vh])
                        prepare(vn, vh, q, T.float32(scale), q_perm, q_codes, q_sigma, q_total)
                if page_weights is None:
                    page_w8, page_hw8, page_sigma, page_total = q_codes, q_codes, q_sigma, q_total  # unused
                else:
                    page_w8 = T.sblock_alloc_buffer((N, KVH, M // GP + 1, G, DP), "int8")
                    page_hw8 = T.sblock_alloc_buffer((N, KVH, M // GP + 1, G, HCP), "int8")
                    page_sigma = T.sblock_alloc_buffer((N, KVH, M // GP + 1, G), "float32")
                    page_total = T.sblock_alloc_buffer((N, KVH, M // GP + 1, G), "float32")
                    for n, g, p in T.grid(N, KVH, M // GP + 1):
                        with T.sblock("page_weights"):
                            vn, vg, vp = T.axis.remap("SSS", [n, g, p])
                            T.reads(
                                q_perm[vn, vg * G : vg * G + G, 0:DP],
                                positions[vn],
                                seq_slot[vn],
                                block_table[0:B, 0:M],
                            )
                            T.writes(
                                page_w8[vn, vg, vp, 0:G, 0:DP], page_hw8[vn, vg, vp, 0:G, 0:HCP],
                                page_sigma[vn, vg, vp, 0:G], page_total[vn, vg, vp, 0:G],
                            )  # fmt: skip
                            page_weights(
                                vn, vg, vp, M, layer, q_perm, positions, seq_slot, block_table, page_w8, page_hw8,
                                page_sigma, page_total,
                            )  # fmt: skip
            score = T.sblock_alloc_buffer((N, H, (M * PS + CH - 1) // CH, CH), "float32")
            prob = T.sblock_alloc_buffer((N, H, (M * PS + CH - 1) // CH, CH), "float32")
            values = T.sblock_alloc_buffer((N, KVH, (M * PS + CH - 1) // CH, CH, D), dtype)
            slot_acc = T.sblock_alloc_buffer((N, H, (M * PS + CH - 1) // CH, S, D), "float32")
            chunk_max = T.sblock_alloc_buffer((N, H, (M * PS + CH - 1) // CH), "float32")
            chunk_sum = T.sblock_alloc_buffer((N, H, (M * PS + CH - 1) // CH), "float32")
            chunk_acc = T.sblock_alloc_buffer((N, H, (M * PS + CH - 1) // CH, D), "float32")
            merged_max = T.sblock_alloc_buffer((N, H), "float32")
            merged_sum = T.sblock_alloc_buffer((N, H), "float32")
            merged_acc = T.sblock_alloc_buffer((N, H, D), "float32")
            for n, g, c in T.grid(N, KVH, (M * PS + CH - 1) // CH):
                for j, d in T.grid(G, D):
                    with T.sblock("q_scaled"):
                        vn = T.axis.spatial(N, n)
                        vh = T.axis.spatial(H, g * G + j)
                        vd = T.axis.spatial(D, d)
                        q_scaled[vn, vh, vd] = T.Cast("float32", q[vn, vh, vd]) * T.float32(scale)
                if int8_scores is not None:
                    with T.sblock("score"):
                        vn, vg, vc = T.axis.remap("SSS", [n, g, c])
                        if page_weights is None:
                            T.reads(
                                q_scaled[vn, vg * G : vg * G + G, 0:D], q_codes[vn, vg * G : vg * G + G, 0:DP],
                                q_sigma[vn, vg * G : vg * G + G], q_total[vn, vg * G : vg * G + G], positions[vn],
                                seq_slot[vn], block_table[0:B, 0:M],
                            )  # fmt: skip
                        else:
                            T.reads(
                                q_scaled[vn, vg * G : vg * G + G, 0:D], page_w8[vn, vg, 0 : M // GP + 1, 0:G, 0:DP],
                                page_hw8[vn, vg, 0 : M // GP + 1, 0:G, 0:HCP], page_sigma[vn, vg, 0 : M // GP + 1, 0:G],
                                page_total[vn, vg, 0 : M // GP + 1, 0:G], positions[vn], seq_slot[vn],
                                block_table[0:B, 0:M],
                            )  # fmt: skip
                        T.writes(score[vn, vg * G : vg * G + G, vc, 0:CH])
                        int8_scores(
                            vn, vg, vc, layer, q_scaled, q_codes, q_sigma, q_total, page_w8, page_hw8, page_sigma,
                            page_total, positions, seq_slot, block_table, score,
                        )  # fmt: skip
                else:
                    for t, d in T.grid(CH, D):
                        with T.sblock("keys"):
                            vn, vg, vc, vt, vd = T.axis.remap("SSSSS", [n, g, c, t, d])
                            keys[vn, vg, vc, vt, vd] = page_row(
                                layer, 0, vn, vg, vc, vt, vd, positions, seq_slot, block_table
                            )
                    for j, t, d in T.grid(G, CH, D):
                        with T.sblock("score"):
                            vn = T.axis.spatial(N, n)
                            vh = T.axis.spatial(H, g * G + j)
                            vc, vt, vd = T.axis.remap("SSR", [c, t, d])
                            with T.init():
                                score[vn, vh, vc, vt] = T.float32(0)
                            score[vn, vh, vc, vt] = score[vn, vh, vc, vt] + q_scaled[vn, vh, vd] * T.Cast(
                                "float32", keys[vn, vh // G, vc, vt, vd]
                            )
                for j, t in T.grid(G, CH):
                    with T.sblock("chunk_max"):
                        vn = T.axis.spatial(N, n)
                        vh = T.axis.spatial(H, g * G + j)
                        vc, vt = T.axis.remap("SR", [c, t])
                        with T.init():
                            chunk_max[vn, vh, vc] = f32_min
                        chunk_max[vn, vh, vc] = T.max(
                            chunk_max[vn, vh, vc],
                            T.if_then_else(
                                vc * CH + vt <= T.Cast("int64", positions[vn]), score[vn, vh, vc, vt], f32_min
                            ),
                        )
                for j, t in T.grid(G, CH):
                    with T.sblock("prob"):
                        vn = T.axis.spatial(N, n)
                        vh = T.axis.spatial(H, g * G + j)
                        vc, vt = T.axis.remap("SS", [c, t])
                        prob[vn, vh, vc, vt] = T.if_then_else(
                            vc * CH + vt <= T.Cast("int64", positions[vn]),
                            T.exp(score[vn, vh, vc, vt] - chunk_max[vn, vh, vc]),
                            T.float32(0),
                        )
                for j, t in T.grid(G, CH):
                    with T.sblock("chunk_sum"):
                        vn = T.axis.spatial(N, n)
                        vh = T.axis.spatial(H, g * G + j)
                        vc, vt = T.axis.remap("SR", [c, t])
                        with T.init():
                            chunk_sum[vn, vh, vc] = T.float32(0)
                        chunk_sum[vn, vh, vc] = chunk_sum[vn, vh, vc] + prob[vn, vh, vc, vt]
                for t, d in T.grid(CH, D):
                    with T.sblock("values"):
                        vn, vg, vc, vt, vd = T.axis.remap("SSSSS", [n, g, c, t, d])
                        values[vn, vg, vc, vt, vd] = page_row(
                            layer, 1, vn, vg, vc, vt, vd, positions, seq_slot, block_table
                        )
                for s, j, d, step in T.grid(S, G, D, STEPS):
                    with T.sblock("slot_acc"):
                        vn = T.axis.spatial(N, n)
                        vh = T.axis.spatial(H, g * G + j)
                        vc, vs, vd, vstep = T.axis.remap("SSSR", [c, s, d, step])
                        with T.init():
                            slot_acc[vn, vh, vc, vs, vd] = T.float32(0)
                        slot_acc[vn, vh, vc, vs, vd] = slot_acc[vn, vh, vc, vs, vd] + prob[
                            vn, vh, vc, vstep * S + vs
                        ] * T.Cast("float32", values[vn, vh // G, vc, vstep * S + vs, vd])
                for j, d, s in T.grid(G, D, S):
                    with T.sblock("chunk_acc"):
                        vn = T.axis.spatial(N, n)
                        vh = T.axis.spatial(H, g * G + j)
                        vc, vd, vs = T.axis.remap("SSR", [c, d, s])
                        with T.init():
                            chunk_acc[vn, vh, vc, vd] = T.float32(0)
                        chunk_acc[vn, vh, vc, vd] = chunk_acc[vn, vh, vc, vd] + slot_acc[vn, vh, vc, vs, vd]
            for n, h in T.grid(N, H):
                for c in T.serial((M * PS + CH - 1) // CH):
                    with T.sblock("merged_max"):
                        vn, vh, vc = T.axis.remap("SSR", [n, h, c])
                        with T.init():
                            merged_max[vn, vh] = f32_min
                        merged_max[vn, vh] = T.max(
                            merged_max[vn, vh],
                            T.if_then_else(vc * CH <= T.Cast("int64", positions[vn]), chunk_max[vn, vh, vc], f32_min),
                        )
                for c in T.serial((M * PS + CH - 1) // CH):
                    with T.sblock("merged_sum"):
                        vn, vh, vc = T.axis.remap("SSR", [n, h, c])
                        with T.init():
                            merged_sum[vn, vh] = T.float32(0)
                        merged_sum[vn, vh] = merged_sum[vn, vh] + T.if_then_else(
                            vc * CH <= T.Cast("int64", positions[vn]),
                            T.exp(chunk_max[vn, vh, vc] - merged_max[vn, vh]) * chunk_sum[vn, vh, vc],
                            T.float32(0),
                        )
                for d, c in T.grid(D, (M * PS + CH - 1) // CH):
                    with T.sblock("merged_acc"):
                        vn, vh, vd, vc = T.axis.remap("SSSR", [n, h, d, c])
                        with T.init():
                            merged_acc[vn, vh, vd] = T.float32(0)
                        merged_acc[vn, vh, vd] = merged_acc[vn, vh, vd] + T.if_then_else(
                            vc * CH <= T.Cast("int64", positions[vn]),
                            T.exp(chunk_max[vn, vh, vc] - merged_max[vn, vh]) * chunk_acc[vn, vh, vc, vd],
                            T.float32(0),
                        )
                for d in T.serial(D):
                    with T.sblock("out"):
                        vn, vh, vd = T.axis.remap("SSS", [n, h, d])
                        out[vn, vh, vd] = T.Cast(dtype, merged_acc[vn, vh, vd] / merged_sum[vn, vh])

    # the cache buffers join the params after q (their count is the format's)
    params = [paged_attention.params[0], *cache, *paged_attention.params[1:]]
    body = _with_page_reads_detected(paged_attention.body, params, cache)
    if int8_scores is not None:
        body = _int8_scores_declared(body, cache)
    func = tirx.PrimFunc(params, body, paged_attention.ret_type, paged_attention.attrs)
    s_tir.analysis.verify_well_formed(func)
    return func


def _int8_query_keys(kv_cache: Any, head_dim: int, page_size: int, wanted: bool | None):
    """The format's key planes for the int8-query scores when they apply (module docstring of
    `cpu/int8_query_scores.py`), else None: asked for (`wanted`, default the format's `int8_query` option:
    True, or None where the block is the faster, `faster_by_default`) on an llvm target, by a format that
    gives them, for a shape the block takes."""
    from tensorpress.schedules.cpu.int8_query_scores import faster_by_default, supported

    current = Target.current(allow_none=True)
    if wanted is None:
        option = getattr(kv_cache, "int8_query", False)
        on_cpu = current is not None and current.kind.name == "llvm"
        wanted = on_cpu and (option is True or (option is None and faster_by_default(head_dim)))
    if not wanted or not hasattr(kv_cache, "int8_query_keys"):
        return None
    if current is not None and str(current.attrs.get("mcpu", "")) not in AVX2_CPUS:
        return None  # vpmaddubsw needs AVX2: the project's CPU levels have it (a bare llvm target may not)
    keys = kv_cache.int8_query_keys(head_dim)
    return keys if supported(keys, head_dim, page_size) else None


def _int8_scores_declared(body: tirx.Stmt, cache: list[tirx.Buffer]) -> tirx.Stmt:
    """`body` with the int8-query "score" block reading every cache tensor whole (the parser could not see
    them: they became params after it ran, and the block's loads are by computed pages)."""
    whole = [tirx.BufferRegion(c, [Range.from_min_extent(0, e) for e in c.shape]) for c in cache]

    def declare(block: sblock_stmt.SBlock) -> sblock_stmt.SBlock:
        if block.name_hint != "score":
            return block
        return sblock_stmt.SBlock(
            block.iter_vars, [*whole, *block.reads], block.writes, block.name_hint, block.body, block.init,
            block.alloc_buffers, block.match_buffers, block.annotations,
        )  # fmt: skip

    return tvm_ffi.structural_map(body, (sblock_stmt.SBlock, declare))


def _with_page_reads_detected(body: tirx.Stmt, params: list[Any], cache: list[tirx.Buffer]) -> tirx.Stmt:
    """`body` with the cache regions that the page gathers read put first in their read regions (the
    parser could not see the cache buffers: they became params after it ran)."""
    known = {p: p for p in params if isinstance(p.ty, tirx.BufferType)}

    def redetect(block: sblock_stmt.SBlock) -> sblock_stmt.SBlock:
        if block.name_hint not in ("keys", "values"):
            return block
        detected, _ = s_tir.analysis.get_sblock_read_write_region(block, known)
        pages = [r for c in cache for r in detected if r.source.same_as(c)]
        return sblock_stmt.SBlock(
            block.iter_vars, [*pages, *block.reads], block.writes, block.name_hint, block.body, block.init,
            block.alloc_buffers, block.match_buffers, block.annotations,
        )  # fmt: skip

    return tvm_ffi.structural_map(body, (sblock_stmt.SBlock, redetect))


# ---------------------------------------------------------------------------------------------- rules


def kernel_name(func: tirx.PrimFunc) -> str | None:
    """The `tensorpress.kernel` attribute of a PrimFunc of this file (None for any other function)."""
    if not isinstance(func, tirx.PrimFunc) or func.attrs is None:
        return None
    name = func.attrs.get(KERNEL_ATTR)
    return str(name) if name is not None else None


def attention_shape(func: tirx.PrimFunc) -> tuple[int, int, int, int]:
    """(query heads, kv heads, head_dim, chunk) of a paged_attention PrimFunc."""
    q = func.params[0]
    heads, head_dim = int(q.shape[1]), int(q.shape[2])
    return heads, int(cache_params(func)[0].shape[3]), head_dim, int(func.attrs[CHUNK_ATTR])


class KVAttentionCPU(dl.ScheduleRule):
    """llvm: one parallel task per (token, kv head) for append, per (token, kv head, chunk) for stage 1
    of attention and per (token, query head) for the merge (`kv_attention_cpu.py`)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        kernel = kernel_name(func)
        if kernel not in (APPEND_KERNEL, ATTENTION_KERNEL, QUANTIZE_KERNEL) or target.kind.name != "llvm":
            return None
        from tensorpress.schedules import kv_attention_cpu

        if kernel == QUANTIZE_KERNEL:
            return kv_attention_cpu.schedule_quantize_pages(func)
        if kernel == APPEND_KERNEL:
            return kv_attention_cpu.schedule_append(func)
        return kv_attention_cpu.schedule_attention(func)


class KVAttentionCUDA(dl.ScheduleRule):
    """cuda: flash-decoding (`kv_attention_cuda.py`): a CTA per (token, kv head, chunk) computes the
    chunk for all query heads of the group, a second kernel merges the chunks in order."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        kernel = kernel_name(func)
        if kernel not in (APPEND_KERNEL, ATTENTION_KERNEL, QUANTIZE_KERNEL) or target.kind.name != "cuda":
            return None
        from tensorpress.schedules import kv_attention_cuda

        if kernel == QUANTIZE_KERNEL:
            return kv_attention_cuda.schedule_quantize_pages(func)
        if kernel == APPEND_KERNEL:
            return kv_attention_cuda.schedule_append(func)
        return kv_attention_cuda.schedule_attention(func)


def kv_attention_rules() -> list[dl.ScheduleRule]:
    """The rules for the kernels of this file (both targets; each says None for the other)."""
    return [KVAttentionCPU(), KVAttentionCUDA()]
