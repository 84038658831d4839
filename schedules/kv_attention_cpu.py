"""llvm schedules of the paged KV kernels (`kv_attention.py`).

Attention stage 1 runs one parallel task per (token, kv head, chunk) (defined for the CPU, a chunk is
`kv_attention.CPU_CHUNK_TOKENS` positions: few partials for the merge to read): the chunk's keys are gathered
transposed ([D, CHUNK] in a task-local buffer) so q·k vectorises over the chunk's positions, as a register
tile: up to 4 heads of the group × 2 or more vectors of positions, 8 sums held in registers over d, so a key
vector is loaded once for the tile's heads. (q·k straight from the pages, once kept for head_dim <= 64,
dequantised a key element once per head of the group and ran scalar: at head_dim 32 and 64 the tile is 7-10x
faster at 32k for the 2-bit formats and 3-6x at 1k.) p = e^(s - m) is computed as vector arithmetic
(`cpu/vector_exp.py`), not a libm call per score. The gather walks the pages row by row (a row's page address
once, its elements in memory order) and writes the tile's columns: twice as fast as walking the tile's rows at
head_dim 128 (the page lookup per element dominated). The chunk's values are read once into a task-local [D,
CHUNK] tile too (a quantised row is decoded once, not once per query head of the group), and p·V vectorises
over the SLOTS slot sums (a vector of 8 positions), a register tile of up to 4 heads × 2 or more channels
(independent sums: no chain of dependent FMAs, see `_schedule_pv`). The merge runs one parallel task per
(token, query head), vectorised over head_dim. Chunks past a token's position are skipped (the CUDA schedule
cannot, see there).

A chunk wholly at or before its token's position (every chunk of a decode token but its last) runs a copy
of the task body in which the definition's clamp of a position to the token's (min(t, position)) and its
masks (t <= position) are gone: there a row's page is the same for a run of rows, so its key and value
gathers read 8 rows per vector (`_gather_rows`) with one page lookup and one dequantisation branch per vector:

    task (n, g, c) ─┬─ c·CHUNK + CHUNK - 1 <= positions[n]:  body without clamps/masks  (blocks "*_full")
                    └─ c·CHUNK <= positions[n] < ...:         body as defined
"""

from __future__ import annotations

import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir import Call, TensorLoad
from tvm.s_tir import stmt as sblock_stmt

from tensorpress.schedules.cpu.loop_helpers import largest_divisor
from tensorpress.schedules.cpu.vector_exp import with_vector_exp
from tensorpress.schedules.kv_attention import attention_shape, cache_params, row_blocks


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
    sch = s_tir.Schedule(with_vector_exp(func))  # exp as arithmetic: libm's expf is a call per element
    score = sch.get_sblock("score")
    task = sch.fuse(*sch.get_loops(score)[:3])
    sch.parallel(task)
    task_var = sch.get(task).loop_var

    int8_scores = not _has_block(sch, "keys")  # scores by one block (`cpu/int8_query_scores.py`)
    if int8_scores:  # q's int8 codes once per token and head, the pages' weights once a page, before the tasks
        sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("q_prepared"))))
        if _has_block(sch, "page_weights"):
            sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("page_weights"))))
    else:  # the chunk's keys transposed, [D, CHUNK], so q·k vectorises over the chunk's positions
        keys = sch.get_sblock("keys")
        sch.transform_layout(keys, ("write", 0), lambda n, g, c, t, d: (n, g, c, d, t))
        j, t, d = sch.get_loops(score)[-3:]  # (the gather keeps its loops (t, d): rows in memory order)
        # register tile: up to TILE_HEADS heads of the group times `vectors` vectors of positions
        # (SCORE_ACCUMULATORS sums in registers over d), so a key vector loaded once serves those heads
        # and a broadcast q element serves `vectors` key vectors: at G8 4 heads x 2 vectors (6 loads
        # per 8 FMAs) beat 8 heads x 1 vector (9 loads; 32k, one thread, int2-kitty 15.4 -> 14.6 ms)
        heads = largest_divisor(int(sch.get(j).extent), TILE_HEADS)
        vectors = largest_divisor(chunk // GATHER_ROWS, max(1, SCORE_ACCUMULATORS // heads))
        head_tiles, j = sch.split(j, [None, heads])
        positions, tile, lanes = sch.split(t, [None, vectors, GATHER_ROWS])
        sch.reorder(head_tiles, positions, d, j, tile, lanes)
        sch.unroll(j)
        sch.unroll(tile)
        sch.vectorize(lanes)
        # the sums in a local tile (constant indices once unrolled: LLVM keeps them in registers; in the
        # task's workspace it stores them after every FMA, not knowing that the key tile is elsewhere)
        in_registers = sch.cache_write(score, 0, "local")
        sch.reverse_compute_at(in_registers, positions)
        sch.decompose_reduction(score, d)
        for loop in sch.get_loops(in_registers)[-2:]:
            sch.unroll(loop)

    # the chunk's values transposed too, [D, CHUNK] (a quantised row decoded once, not once per query head
    # of the group): p·V runs over the SLOTS slot sums as one vector (slot s sums the positions
    # t = step·SLOTS + s, in step order, as defined), into slot sums kept [D, SLOTS]; chunk_acc adds a
    # channel's SLOTS sums in slot order
    sch.transform_layout(sch.get_sblock("values"), ("write", 0), lambda n, g, c, t, d: (n, g, c, d, t))
    _schedule_pv(sch, sch.get_sblock("slot_acc"), head_dim)

    merged_acc = sch.get_sblock("merged_acc")
    d, c = sch.get_loops(merged_acc)[-2:]
    sch.reorder(c, d)  # e^(m_c - M) once per chunk, the columns vectorised
    sch.vectorize(d)
    out = sch.get_sblock("out")
    n, h = sch.get_loops(out)[:2]
    sch.vectorize(sch.get_loops(out)[-1])
    sch.parallel(sch.fuse(n, h))

    # task = (n * KVH + g) * C + c  ->  skip chunk c when c * CHUNK > positions[n]; a chunk wholly at or
    # before positions[n] (all but the last of a decode token) runs a copy without the clamps and masks
    scheduled = sch.mod["main"]
    names = [p.name for p in scheduled.params]
    positions = scheduled.params[names.index("positions")]
    block_table = scheduled.params[names.index("block_table")]
    page_size = int(cache_params(scheduled)[0].shape[4])
    chunks = (block_table.shape[1] * page_size + chunk - 1) // chunk
    token = tirx.floordiv(task_var, kv_heads * chunks)
    start = tirx.floormod(task_var, chunks) * chunk
    position = positions[token].astype("int64")
    versioned = _versioned_task(scheduled, task_var, start + chunk - 1 <= position, start <= position)
    sch = s_tir.Schedule(versioned)
    if not int8_scores:
        _gather_rows(sch, sch.get_sblock("keys" + FULL), head_dim)
    value_rows = _gather_rows(sch, sch.get_sblock("values" + FULL), head_dim)
    for prob in ("prob", "prob" + FULL):  # p = e^(s - m) over the chunk's positions, a vector at a time
        sch.vectorize(sch.get_loops(sch.get_sblock(prob))[-1])
    if page_size % (GATHER_VECTORS * GATHER_ROWS) == 0:  # a row group's 16 rows in one page
        rows_var = sch.get(value_rows).loop_var
        return s_tir.Schedule(_page_kind_unswitched(sch.mod["main"], rows_var, "values" + FULL))
    return sch


def _has_block(sch: s_tir.Schedule, name: str) -> bool:
    return any(sch.get(b).name_hint == name for b in sch.get_child_blocks(sch.get_sblock("root")))


GATHER_ROWS = 8  # rows of a key gather's vector (an AVX2 register of fp32)
SCORE_ACCUMULATORS = 8  # q·k sums held in registers (of 16 ymm: the rest for keys and broadcast q)
PV_ACCUMULATORS = 8  # p·V slot-sum vectors held in registers (the rest for value vectors)
TILE_HEADS = 4  # query heads of a q·k or p·V register tile (the rest of its sums: positions or channels)


def _schedule_pv(sch: s_tir.Schedule, slot_acc, head_dim: int) -> None:
    """p·V as a register tile of PV_ACCUMULATORS slot-sum vectors: up to TILE_HEADS heads of the group
    times `channels` channels, over the chunk's steps. Each (head, channel) sums its SLOTS slots in step
    order, as defined (so results are what one chain per (head, channel) gives, bit for bit), but the
    tile's sums are independent chains: a step's FMAs no longer wait on the previous step's, a value
    vector loaded once serves the tile's heads and a p vector its channels (6 loads per 8 FMAs at G8).
    One chain per (head, channel), its 16 dependent FMAs waiting on FMA latency, took 31% of the kernel
    (32k, G8, one thread, int2-kitty 17.9 -> 15.4 ms with the tile). The sums live in a local tile
    (constant indices once unrolled: LLVM keeps them in registers) written to slot_acc as whole vectors
    (written slot by slot, LLVM copied the tile through the stack in pieces, 20% of the kernel)."""
    sch.transform_layout(slot_acc, ("write", 0), lambda n, h, c, s, d: (n, h, c, d, s))
    s, j, d, step = sch.get_loops(slot_acc)[-4:]
    heads = largest_divisor(int(sch.get(j).extent), TILE_HEADS)
    channels = largest_divisor(head_dim, PV_ACCUMULATORS // heads)
    head_tiles, j = sch.split(j, [None, heads])
    channel_tiles, d = sch.split(d, [None, channels])
    sch.reorder(head_tiles, channel_tiles, step, j, d, s)
    sch.unroll(j)
    sch.unroll(d)
    sch.vectorize(s)
    in_registers = sch.cache_write(slot_acc, 0, "local")
    sch.reverse_compute_at(in_registers, channel_tiles)
    sch.decompose_reduction(slot_acc, step)
    tile_heads, tile_channels, slots = sch.get_loops(in_registers)[-3:]
    sch.unroll(tile_heads)
    sch.unroll(tile_channels)
    sch.vectorize(slots)


GATHER_VECTORS = 2  # vectors of rows per channel step: a channel's terms (scale, boost) serve 16 rows
BYTE_CODES = 4  # channels read together: the 2-bit codes of one byte (see _gather_rows)


def _page_kind_unswitched(func: tirx.PrimFunc, rows_var: tirx.Var, block_name: str) -> tirx.PrimFunc:
    """`func` with the body of the gather's loop over row groups (`rows_var`, 16 rows of one page in a full
    chunk) run as one of two copies, chosen once per group: the page read's `if_then_else(page kind, a, b)`
    (a page-granular format: full-precision or quantised page) replaced by a in one and b in the other.
    LLVM unswitches that branch out of the channel loop only while the kernel is small enough, and the
    per-row scales of a quantised page are then loaded once per group instead of once per channel; this does
    it in TIR, whatever else the kernel holds (the int8-query scores made the kernel too large for LLVM, and
    the gather then re-read each byte of codes for each of its 4 channels). The group's block-table entry is
    read once, before the choice, and every page lookup of the copies uses it."""
    block_table = func.params[[p.name for p in func.params].index("block_table")]
    found = []

    def first_page_choice(block):
        choices = []

        def visit(call):  # the choice between the page kinds: its condition reads the block table
            if call.op.name == "prim.if_then_else" and not choices and _reads(call.args[0], block_table):
                choices.append(call)
            return call

        tvm_ffi.structural_map(block.body, (Call, visit))
        return choices[0] if choices else None

    def unswitch(loop: tirx.For):
        if not loop.loop_var.same_as(rows_var):
            return loop
        realizes, inner = [], []

        def visit_realize(realize):
            if realize.block.name_hint == block_name:
                realizes.append(realize)
            return realize

        def visit_loop(inner_loop):
            inner.append(inner_loop.loop_var)
            return inner_loop

        tvm_ffi.structural_map(loop.body, [(sblock_stmt.SBlockRealize, visit_realize), (tirx.For, visit_loop)])
        if len(realizes) != 1 or (choice := first_page_choice(realizes[0].block)) is None:
            return loop
        realize = realizes[0]
        bound = {iv.var: value for iv, value in zip(realize.block.iter_vars, realize.iter_values)}
        at_group_start = {v: tirx.const(0, v.ty) for v in inner}
        # the group's block-table entry, read once: every element's page lookup becomes this variable (the same
        # page for all the group's rows), so that LLVM sees one address a row and shares a byte between channels
        entries: list = []

        def visit_table(load):
            if load.source.same_as(block_table) and not any(tvm_ffi.structural_equal(load, e) for e, _ in entries):
                entries.append((load, tirx.Var("group_entry", load.ty)))
            return load

        tvm_ffi.structural_map(realize.block.body, (TensorLoad, visit_table))

        def hoisted(node):
            return next((var for load, var in entries if tvm_ffi.structural_equal(node, load)), node)

        condition = _substituted(
            _substituted(tvm_ffi.structural_map(choice.args[0], (TensorLoad, hoisted)), bound), at_group_start
        )
        copies = [
            tvm_ffi.structural_map(
                loop.body, [(Call, lambda c, arm=arm: arm if c.same_as(choice) else c), (TensorLoad, hoisted)]
            )
            for arm in (choice.args[1], choice.args[2])
        ]
        found.append(loop)
        body = tirx.IfThenElse(condition, copies[0], _fresh_defs(func, copies[1]))
        lets = [tirx.LetStmt(var, _substituted(_substituted(load, bound), at_group_start)) for load, var in entries]
        body = tirx.SeqStmt([*lets, body])
        return tirx.For(
            loop.loop_var, loop.min, loop.extent, loop.kind, body, loop.thread_binding, loop.annotations,
            loop.step, loop.span,
        )  # fmt: skip

    body = tvm_ffi.structural_map(func.body, (tirx.For, unswitch))
    return func.with_body(body) if found else func


def _substituted(expr, mapping: dict):
    return tvm_ffi.structural_map(expr, (tirx.Var, lambda v: mapping.get(v, v)))


def _gather_rows(sch: s_tir.Schedule, keys, head_dim: int):
    """A full chunk's key or value gather into its [D, CHUNK] tile, vectorised over GATHER_ROWS rows: one
    element of 8 consecutive rows per vector, so the page lookup (the same for all 8 rows when the page
    size is a multiple of 8: no clamp in a full chunk) and a channel's per-channel terms (a per-channel
    scale, which channels have more bits) are scalars, and the tile is written in whole vectors. The
    channels run BYTE_CODES at a time, unrolled, so the bytes that hold 4 channels' codes are loaded once.
    (int2-kitty at 32k context, one thread, CPU time: 82 ms before the full-chunk copy, 52 with it and this
    gather of keys, 39 with values gathered the same way; fp32 about the same either way: its time is
    the page reads.) GATHER_VECTORS vectors of rows per channel step share the channel's terms: 16 rows
    (32k, G4: 33.5 -> 31.3 ms; 32 rows spill registers and take twice as long)."""
    t, d = sch.get_loops(keys)[-2:]
    rows, vectors, lanes = sch.split(t, [None, GATHER_VECTORS, GATHER_ROWS])
    sch.reorder(rows, d, vectors, lanes)
    sch.unroll(vectors)
    sch.vectorize(lanes)
    if head_dim % BYTE_CODES == 0:
        _, codes = sch.split(d, [None, BYTE_CODES])
        sch.unroll(codes)
    return rows


FULL = "_full"  # suffix of the blocks of a chunk wholly at or before the token's position


def _versioned_task(func: tirx.PrimFunc, task_var: tirx.Var, full: tirx.PrimExpr, started: tirx.PrimExpr):
    """`func` with the body of the task loop run as one of two versions: for a chunk wholly at or before
    the token's position (`full`) without the clamps and masks of positions, else (`started` and not
    `full`) as it is; a chunk past the position runs neither. Each is a loop of 1 or 0 iterations
    rather than an `if` (what TVM's passes expect of a CPU task body)."""
    positions = func.params[[p.name for p in func.params].index("positions")]
    found = []

    def split(loop: tirx.For) -> tirx.For:
        if not loop.loop_var.same_as(task_var):
            return loop
        found.append(loop)
        once = lambda name, cond, body: tirx.For(  # noqa: E731
            tirx.Var(name, "int64"), tirx.IntImm("int64", 0), cond.astype("int64"), tirx.ForKind.SERIAL, body
        )
        body = tirx.SeqStmt(
            [
                once("run_full", full, _fresh_defs(func, _without_position_clamps(loop.body, positions, FULL))),
                once("run_partial", tirx.And(started, tirx.Not(full)), loop.body),
            ]
        )
        return tirx.For(
            loop.loop_var, loop.min, loop.extent, loop.kind, body, loop.thread_binding, loop.annotations,
            loop.step, loop.span,
        )  # fmt: skip

    new_body = tvm_ffi.structural_map(func.body, (tirx.For, split))
    if len(found) != 1:
        raise RuntimeError(f"expected one loop over {task_var}, found {len(found)}")
    return func.with_body(new_body)


def _fresh_defs(func: tirx.PrimFunc, body: tirx.Stmt) -> tirx.Stmt:
    """A copy of `body` (a statement of `func`) whose loops and blocks define new variables; the
    buffers and variables it takes from outside (params, shapes, the root's buffers) stay the same."""
    renewed = s_tir.renew_defs(func.with_body(body))
    outside = {}
    for old, new in zip(func.params, renewed.params):
        outside[new] = old
        if isinstance(old.ty, tirx.BufferType):
            outside.update({n: o for n, o in zip(new.shape, old.shape) if isinstance(n, tirx.Var)})
    root_buffers = {b.name: b for b in func.body.block.alloc_buffers}
    by_name = {v.name: v for v in outside.values() if isinstance(v, tirx.Var)}

    def var(v):
        if v in outside:
            return outside[v]
        return (root_buffers if isinstance(v.ty, tirx.BufferType) else by_name).get(v.name, v)

    return tvm_ffi.structural_map(renewed.body, (tirx.Var, var))


def _reads(expr, buffer: tirx.Buffer) -> bool:
    """Whether `expr` loads from `buffer`."""
    found = []

    def visit(load):
        if load.source.same_as(buffer):
            found.append(load)
        return load

    tvm_ffi.structural_map(expr, (TensorLoad, visit))
    return bool(found)


def _without_position_clamps(body: tirx.Stmt, positions: tirx.Buffer, suffix: str) -> tirx.Stmt:
    """`body` for a chunk that lies wholly at or before the token's position: every `min(x, position)`
    clamp is x and every `x <= position` mask is true (so the page of a row is the same for all rows of
    a vector), and its blocks are renamed with `suffix` (a function's block names are unique)."""

    def unclamp(node: tirx.Min):
        return node.a if _reads(node.b, positions) else node

    def unmask(node: tirx.LE):
        return tirx.const(True, "bool") if _reads(node.b, positions) else node

    def rename(block: sblock_stmt.SBlock):
        return sblock_stmt.SBlock(
            block.iter_vars, block.reads, block.writes, block.name_hint + suffix, block.body, block.init,
            block.alloc_buffers, block.match_buffers, block.annotations,
        )  # fmt: skip

    return tvm_ffi.structural_map(body, [(tirx.Min, unclamp), (tirx.LE, unmask), (sblock_stmt.SBlock, rename)])
