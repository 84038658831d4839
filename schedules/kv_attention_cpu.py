"""llvm schedules of the paged KV kernels (`kv_attention.py`).

Attention stage 1 runs one parallel task per (token, kv head, chunk): for head_dim > 64 the chunk's
keys are gathered transposed ([D, CHUNK] in a task-local buffer) so q·k vectorises over the chunk's
positions (for short rows q·k reads the pages directly). The gather walks the pages row by row (a row's
page address once, its elements in memory order) and writes the tile's columns: twice as fast as walking
the tile's rows at head_dim 128 (the page lookup per element dominated). The chunk's values are read once
into a task-local [CHUNK, D] tile too (a quantised row is decoded once, not once per query head of the
group), and p·V vectorises over head_dim. The merge runs one parallel task per (token, query head),
vectorised over head_dim. Chunks past a token's position are skipped (the CUDA schedule cannot, see there).
"""

from __future__ import annotations

from tvm import s_tir, tirx

from tensorpress.schedules.kv_attention import attention_shape, cache_params, guard_loop_body, row_blocks

INLINE_KEYS_UP_TO = 64  # head_dim up to which q·k reads the pages directly (measured on AVX2)


def schedule_append(func: tirx.PrimFunc) -> s_tir.Schedule:
    """kv_append: a parallel task per (token, kv head), the row write vectorised. A format's per-row
    blocks before it (a scale's absmax) run as parallel tasks over their spatial loops."""
    sch = s_tir.Schedule(func)
    for block, spatial in row_blocks(sch):
        sch.parallel(sch.fuse(*sch.get_loops(block)[:spatial]))
    n, g, d = sch.get_loops(sch.get_sblock("append"))
    sch.parallel(sch.fuse(n, g))
    sch.vectorize(d)
    return sch


def spatial_loop_count(sch: s_tir.Schedule, block) -> int:
    """How many of a block's leading loops are spatial (the kernels of this file put reductions last)."""
    return sum(1 for iv in sch.get(block).iter_vars if iv.iter_type == tirx.IterVar.DataPar)


def schedule_quantize_pages(func: tirx.PrimFunc) -> s_tir.Schedule:
    """kv_quantize_pages: every block a parallel task per point of its spatial loops (page, layer, kv
    head, channel or token), reductions in the task. It runs once per page group, not per token."""
    sch = s_tir.Schedule(func)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        sch.parallel(sch.fuse(*sch.get_loops(block)[: spatial_loop_count(sch, block)]))
    return sch


def schedule_attention(func: tirx.PrimFunc) -> s_tir.Schedule:
    _, kv_heads, head_dim, chunk = attention_shape(func)
    sch = s_tir.Schedule(func)
    score = sch.get_sblock("score")
    task = sch.fuse(*sch.get_loops(score)[:3])
    sch.parallel(task)
    task_var = sch.get(task).loop_var

    keys = sch.get_sblock("keys")
    if head_dim <= INLINE_KEYS_UP_TO:  # short rows: q·k straight from the pages beats a gathered tile
        sch.compute_inline(keys)
        j, t, d = sch.get_loops(score)[-3:]
        sch.reorder(t, j, d)  # a key row's address once for all heads of the group
    else:  # the chunk's keys transposed, [D, CHUNK], so q·k vectorises over the chunk's positions
        sch.transform_layout(keys, ("write", 0), lambda n, g, c, t, d: (n, g, c, d, t))
        j, t, d = sch.get_loops(score)[-3:]  # (the gather keeps its loops (t, d): rows in memory order)
        sch.reorder(j, d, t)
        sch.vectorize(t)

    values = sch.get_sblock("values")  # the chunk's V rows, read (dequantised) once into a [CHUNK, D] tile
    sch.vectorize(sch.get_loops(values)[-1])
    slot_acc = sch.get_sblock("slot_acc")
    s, j, d, step = sch.get_loops(slot_acc)[-4:]
    sch.reorder(step, s, j, d)  # a value row's address once for all heads of the group
    sch.vectorize(d)
    chunk_acc = sch.get_sblock("chunk_acc")
    j, d, s = sch.get_loops(chunk_acc)[-3:]
    sch.reorder(j, s, d)
    sch.vectorize(d)

    merged_acc = sch.get_sblock("merged_acc")
    d, c = sch.get_loops(merged_acc)[-2:]
    sch.reorder(c, d)  # e^(m_c - M) once per chunk, the columns vectorised
    sch.vectorize(d)
    out = sch.get_sblock("out")
    n, h = sch.get_loops(out)[:2]
    sch.vectorize(sch.get_loops(out)[-1])
    sch.parallel(sch.fuse(n, h))

    # task = (n * KVH + g) * C + c  ->  skip chunk c when c * CHUNK > positions[n]
    scheduled = sch.mod["main"]
    names = [p.name for p in scheduled.params]
    positions = scheduled.params[names.index("positions")]
    block_table = scheduled.params[names.index("block_table")]
    page_size = int(cache_params(scheduled)[0].shape[4])
    chunks = (block_table.shape[1] * page_size + chunk - 1) // chunk
    token = tirx.floordiv(task_var, kv_heads * chunks)
    condition = tirx.floormod(task_var, chunks) * chunk <= positions[token].astype("int64")
    return s_tir.Schedule(guard_loop_body(scheduled, task_var, condition))
