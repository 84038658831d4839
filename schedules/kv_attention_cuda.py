"""CUDA schedules of the paged KV kernels (`kv_attention.py`): flash-decoding, deterministic.

Stage 1 — one CTA per (token n, kv head g, chunk c) of CHUNK positions, D threads laid out as
threadIdx.x = TX = D/8 lanes (each owns 8 consecutive elements of a row: one 16-byte load) and
threadIdx.y = TY = SLOTS = 8 rows. The G query heads of the kv head share every K/V load.

    q_scaled   q[n, group heads] * 1/√D -> shared fp32 [G, D]
    keys       the chunk's K rows, 16-byte loads, -> shared [CHUNK, D]         (coalesced: a warp reads
                                                                                 2 (D=128) .. 4 rows)
    score      per head in turn, thread (y, x) takes row t = 8·step + y and its 8 columns; the 8
               products are summed in the thread, then over the TX lanes by warp shuffles
                                                                              -> shared fp32 [G, CHUNK]
    chunk_max  per head (threadIdx.y), over the chunk: in-thread then shuffles -> shared [G]
    prob       exp(s - m), 0 past the token's position                       -> shared [G, CHUNK]
    chunk_sum  like chunk_max                                                 -> workspace
    slot_acc   thread (y, x) sums rows t ≡ y (mod 8) of V·p for its 8 columns and the heads of a
               pass (`pv_plan`) in registers; V comes straight from the pages into registers
               (16-byte loads)                                -> shared fp32 [8, heads of the pass, D]
    chunk_acc  the 8 slot partials summed in slot order                       -> workspace

Stage 2 — one CTA per (token, query head), one thread per column: max, weighted sums and the output,
over the token's chunks in chunk order.

Barriers: TVM's ThreadSync pass puts a __syncthreads() between each stage above that writes a shared
buffer and the next stage that reads it (RAW), and before a stage that overwrites a shared buffer
others may still read (WAR; StorageRewrite may place slot_acc in the storage of `keys`, and prob in
that of `score`: both are dead by then, and at least two barriers separate their last readers from
the new writer). Every barrier is reached by all threads of the CTA (no branch encloses one).
The CPU replay cannot see a missing barrier; `tests/schedules/test_kv_attention_cuda.py` checks in
the lowered kernel that every shared-buffer read follows a barrier placed after the last write by
another statement. Races between CTAs (two CTAs writing one workspace row) the replay does see: it
runs the CTAs in shuffled orders (see `_divisor_at_most`).

Why SIMT, not Tensor Cores, for q·k and p·V. A CTA's products are [G query heads] x [CHUNK rows] x D with
G = 4..8 (the GQA group): an mma.m16n8k16 would run with G of its 16 rows used. With fp16 pages that
costs nothing: each K/V element loaded feeds 2·G FLOPs, 4..8 FLOP per byte, under the H100's SIMT fp32
ridge (~67 TFLOP/s over 3.35 TB/s, ~20 FLOP/B), so the FMAs keep up with HBM. With 2-bit pages (~0.33 B
an element, metadata included) the same work is 24..48 FLOP/B: at G = 8 the SIMT kernel passes the ridge
and becomes compute-bound, so Tensor Cores (the group's heads padded to 16 rows, pages decoded into B
fragments as the weight GEMM's fragment decode does) are the next step for the 2-bit read; not built.

Prefill runs the same kernels, one query token per CTA row of the grid: correct and parallel, but
neither query-tiled nor sparing of the workspace (N x H x chunks x D fp32: 17 GB for 16 x 2048
prompt tokens at Llama-7B's shape). A query-tiled prefill kernel is the next step.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from tensorpress.errors import ShapeError
from tensorpress.schedules.kv_attention import SLOTS, attention_shape, cache_params, row_blocks

TY = SLOTS  # thread rows: the slots of the p·V sums
VECTOR = 8  # fp16 elements per 16-byte load
APPEND_THREADS = 128


def pv_plan(group: int, head_dim: int) -> tuple[int, int]:
    """(heads per pass, V rows in flight) of the p·V stage for `group` query heads per kv head.

    A thread holds 8 fp32 sums per head of a pass, and nvcc converts the V rows it loads ahead to 8
    fp32 registers each. Up to 4 heads: one pass, all 8 rows of a thread loaded at once (4 for 2 heads
    of 128 columns: at 8, ptxas 13.0 spills two addresses on sm_90a). 5 to 8 heads (their chunks are 32
    positions, `kv_attention.chunk_tokens`, so the shared sums of 8 heads fit): one pass, 2 rows
    ahead. Chosen from ptxas's reports for head_dim 64/128 on sm_80/sm_90a (< 128 registers, no
    spills; `test_kv_attention_cuda.py` keeps it so); more heads take further passes over V.
    """
    if group <= 4:
        return group, 4 if (group, head_dim) == (2, 128) else 8
    return _divisor_at_most(group, 8), 2


def _divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of n that is <= cap.

    Head loops are split by divisors only: a padded split would make the blocks that TVM derives from
    regions (the chunk-max copy, the write-back of chunk_acc) cover heads of the *next* kv group, so
    two CTAs would write the same workspace rows (the CPU replay caught this with shuffled CTAs).
    """
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def thread_layout(head_dim: int) -> tuple[int, int]:
    """(TX, TY) of the attention kernels: TX lanes of 8 columns each, TY = SLOTS rows."""
    if head_dim % VECTOR:
        raise ShapeError(
            f"the CUDA paged attention needs head_dim to be a multiple of {VECTOR}, got {head_dim}; "
            "compile for the CPU or pad the heads."
        )
    return head_dim // VECTOR, TY


def schedule_append(func: tirx.PrimFunc) -> s_tir.Schedule:
    """kv_append: one thread per 8 consecutive elements of a row (16-byte loads and stores). A format's
    per-row blocks before it (a scale's absmax) run first, one thread per row, reductions in the thread."""
    sch = s_tir.Schedule(func)
    for row_block, spatial in row_blocks(sch):
        rows = sch.fuse(*sch.get_loops(row_block)[:spatial])
        bx, tx = sch.split(rows, [None, APPEND_THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    block = sch.get_sblock("append")
    n, g, d = sch.get_loops(block)
    vec = VECTOR if int(sch.get(d).extent) % VECTOR == 0 else 1
    d_o, d_i = sch.split(d, [None, vec])
    bx, tx = sch.split(sch.fuse(n, g, d_o), [None, APPEND_THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    if vec > 1:
        sch.vectorize(d_i)
    return sch


def schedule_quantize_pages(func: tirx.PrimFunc) -> s_tir.Schedule:
    """kv_quantize_pages: every block one thread per point of its spatial loops, reductions in the thread
    (it runs once per page group leaving the window; the decode attention is the kernel that matters)."""
    sch = s_tir.Schedule(func)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        spatial = sum(1 for iv in sch.get(block).iter_vars if iv.iter_type == tirx.IterVar.DataPar)
        bx, tx = sch.split(sch.fuse(*sch.get_loops(block)[:spatial]), [None, APPEND_THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    return sch


def _bind_threads(sch: s_tir.Schedule, loops, tx: int, vec: int = 1, vector_gather: bool = True) -> None:
    """Spread the fused `loops` over (threadIdx.y = TY, threadIdx.x = tx[, vec elements each, vectorized
    or, for a gather that is not one vector load, unrolled: `_gathers_one_vector`])."""
    fused = sch.fuse(*loops)
    factors = [None, TY, tx] + ([vec] if vec > 1 else [])
    parts = sch.split(fused, factors)
    sch.bind(parts[1], "threadIdx.y")
    sch.bind(parts[2], "threadIdx.x")
    if vec > 1 and vector_gather:
        sch.vectorize(parts[3])
    elif vec > 1:
        sch.unroll(parts[3])


def _gathers_one_vector(func: tirx.PrimFunc) -> bool:
    """Whether a page row's VECTOR elements come from one cache tensor (a plain vector load). A format
    with per-row metadata (int8 codes + a scale) reads several: its gathers are unrolled, since TVM
    0.27's CUDA codegen cannot broadcast a float32 to 8 lanes (make_ulonglong4 of 8 scalars)."""
    return len(cache_params(func)) == 1


def _row_reduce(sch: s_tir.Schedule, block, tx: int, group: int) -> None:
    """A reduction over the chunk per head: heads -> threadIdx.y, positions -> threadIdx.x then serial
    (in-thread first, then across the lanes; the reduction loops are the innermost, as TVM's
    cross-thread reduction needs). Head rows are never padded (see `_divisor_at_most`)."""
    j, t = sch.get_loops(block)[3:]
    j_o, j_i = sch.split(j, [None, _divisor_at_most(group, TY)])
    t_o, t_i = sch.split(t, [None, tx])
    sch.reorder(j_o, j_i, t_i, t_o)
    sch.bind(j_i, "threadIdx.y")
    sch.bind(t_i, "threadIdx.x")


def schedule_attention(func: tirx.PrimFunc) -> s_tir.Schedule:
    """Both stages of paged_attention (module docstring).

    Chunks past a token's position run like the others (on the clamped, cached last row; the merge
    masks them out): skipping them would need a branch around the CTA's work, and TVM places no
    barrier inside a branch nor lowers a cross-thread reduction below one. Decode batches of equal
    lengths have no such chunks; prefill and ragged batches do (up to half the CTAs of a prefill).
    """
    heads, kv_heads, head_dim, _ = attention_shape(func)
    group = heads // kv_heads
    tx, _ = thread_layout(head_dim)
    sch = s_tir.Schedule(func)

    # ---- stage 1: the loops (n, g, c) that every stage-1 block shares become the grid
    score = sch.get_sblock("score")
    n, g, c = sch.get_loops(score)[:3]
    sch.bind(n, "blockIdx.x")  # tokens on x: up to 2^31 - 1 (y and z stop at 65535: a long prefill)
    sch.bind(g, "blockIdx.y")
    sch.bind(c, "blockIdx.z")

    q_scaled = sch.get_sblock("q_scaled")
    _bind_threads(sch, sch.get_loops(q_scaled)[3:], tx)
    sch.set_scope(q_scaled, 0, "shared")
    vector_gather = _gathers_one_vector(func)
    keys = sch.get_sblock("keys")
    _bind_threads(sch, sch.get_loops(keys)[3:], tx, vec=VECTOR, vector_gather=vector_gather)
    sch.set_scope(keys, 0, "shared")

    j, t, d = sch.get_loops(score)[3:]
    t_step, t_row = sch.split(t, [None, TY])
    d_lane, d_vec = sch.split(d, [tx, VECTOR])
    sch.reorder(j, t_step, t_row, d_lane, d_vec)
    sch.annotate(j, "disable_unroll", 1)
    sch.bind(t_row, "threadIdx.y")
    sch.bind(d_lane, "threadIdx.x")
    sch.set_scope(score, 0, "shared")

    chunk_max = sch.get_sblock("chunk_max")
    _row_reduce(sch, chunk_max, tx, group)
    max_copy = sch.cache_write(chunk_max, 0, "shared", consumer_blocks=[sch.get_sblock("prob")])
    sch.reverse_compute_at(max_copy, c)  # the shared max -> the workspace, for the merge
    copy_loops = sch.get_loops(max_copy)[3:] or [sch.add_unit_loop(max_copy)]  # one head: no loop left
    _bind_threads(sch, copy_loops, tx)

    prob = sch.get_sblock("prob")
    _bind_threads(sch, sch.get_loops(prob)[3:], tx)
    sch.set_scope(prob, 0, "shared")
    _row_reduce(sch, sch.get_sblock("chunk_sum"), tx, group)

    slot_acc = sch.get_sblock("slot_acc")
    s, j, d, step = sch.get_loops(slot_acc)[3:]
    heads_per_pass, rows_in_flight = pv_plan(group, head_dim)
    head_pass, j_in = sch.split(j, [None, heads_per_pass])
    d_lane, d_vec = sch.split(d, [tx, VECTOR])
    sch.reorder(head_pass, s, d_lane, step, j_in, d_vec)
    sch.annotate(head_pass, "disable_unroll", 1)  # one pass's sums live at a time (registers)
    if rows_in_flight < int(sch.get(step).extent):  # (pragma_unroll 1 would mean "unroll fully")
        sch.annotate(step, "pragma_unroll", rows_in_flight)
    sch.bind(s, "threadIdx.y")
    sch.bind(d_lane, "threadIdx.x")
    sch.compute_at(sch.get_sblock("values"), step)
    values = sch.get_sblock("values")
    if vector_gather:
        sch.vectorize(sch.get_loops(values)[-1])
    else:
        sch.unroll(sch.get_loops(values)[-1])
    sch.set_scope(values, 0, "local")
    slot_copy = sch.cache_write(slot_acc, 0, "local")  # the sums stay in registers ...
    sch.reverse_compute_at(slot_copy, d_lane)
    sch.set_scope(slot_copy, 0, "shared")  # ... and meet in shared memory at the end of the pass
    for loop in sch.get_loops(slot_acc)[-2:]:
        sch.unroll(loop)
    chunk_acc = sch.get_sblock("chunk_acc")
    sch.reverse_compute_at(chunk_acc, head_pass)
    *heads_and_columns, _ = sch.get_loops(chunk_acc)[4:]  # (a 1-head pass has no head loop); slots serial
    _bind_threads(sch, heads_and_columns, tx)

    # ---- stage 2: merge, one CTA per (token, query head), a thread per column
    out = sch.get_sblock("out")
    n2, h2, d2 = sch.get_loops(out)
    sch.bind(n2, "blockIdx.x")
    sch.bind(h2, "blockIdx.y")
    sch.bind(d2, "threadIdx.x")
    for name in ("merged_acc", "merged_sum", "merged_max"):
        block = sch.get_sblock(name)
        sch.compute_at(block, d2)
        sch.set_scope(block, 0, "local")
    return sch
