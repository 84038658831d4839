"""The scatter of a tile-scatter stage (`decode_stage.py`, "Tile scatter") in TIR, written once for
every scatter format and every place that expands one: the weight GEMM's "decode" block (all of W, one
thread: the CPU's path and the definition the tests check) and the Tensor Core template's shared W tile
(the CTA's threads, `schedules/tensorcore/template.py`).

    region of W to build: rows [row0, row0 + rows) x cols [col0, col0 + cols), in tiles of TR x TC

    1. zero-fill            every thread stores zeros, 8 values (16 B) at a time, strided by the threads
    2. barrier              (threads only: a zero must not land after a value)
    3. scatter              the region's tiles are dealt out to the threads, L threads a tile:
                              tile j -> threads with t // L == j mod (threads // L), lane t % L
                              its words [first, end) in groups of 4 (one 128-bit load each):
                                group g = lane, lane + L, ...:  w[0:4] = words[first + 4g : first + 4g + 4]
                                each w[e]: (r, c, value) = element(w[e])
                                           out[TR tr + r, TC tc + c] = value   if inside the region
    (the template's next reads, ldmatrix, get their barrier from TVM's ThreadSync: a read after a write)

      W tile of the template (block_m x block_k), e.g. 64 x 128 over format tiles of 16 x 64:
        ┌────────┬────────┐   8 format tiles, 128 threads: 16 threads a tile, each taking every
        │ (0, 0) │ (0, 1) │   16th group of 4 words of its tile; block_k = 32 covers half a tile
        ├────────┼────────┤   along K: its words are all read, the half outside the region dropped
        │ (1, 0) │ (1, 1) │
        │  ...   │  ...   │
        └────────┴────────┘

Stores land at the buffer's own (row, col), so the W tile's layout (padded rows, see the template)
is what both the scatter and ldmatrix address. Padding words repeat a stored value, so a tile may be
written twice at one position with the same value; a fully dense tile has no padding and works alike.
Tiles past the stored grid (K padded to whole K tiles inside the kernel) hold no word.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import tirx

from tensorpress.schedules.decode_stage import TileScatter

ZERO_LANES = 8  # fp16 zeros per store: 16 bytes


@dataclass(frozen=True)
class ScatterRegion:
    """The part of W a scatter builds: `rows` x `cols` from (row0, col0) (TIR), inside an [m, k] weight."""

    row0: tirx.PrimExpr
    col0: tirx.PrimExpr
    rows: int
    cols: int
    m: int
    k: int


@dataclass(frozen=True)
class ScatterThreads:
    """The threads that share a scatter: `wrap(body_of)` is the statement body_of(index) under the
    thread loops, index the flat thread index (TIR, 0 .. count - 1); `barrier()` the statement that
    makes one phase's stores visible to the next (None: one thread, nothing to wait for)."""

    count: int
    wrap: Callable[[Callable[[tirx.PrimExpr], tirx.Stmt]], tirx.Stmt]
    barrier: Callable[[], tirx.Stmt] | None


def one_thread() -> ScatterThreads:
    return ScatterThreads(1, lambda body_of: body_of(tirx.const(0, "int32")), None)


def scatter_statement(
    scatter: TileScatter, stored: list[tirx.Buffer], out: tirx.Buffer, region: ScatterRegion, threads: ScatterThreads
) -> tuple[tirx.Stmt, list[tirx.Buffer]]:
    """(the statement of the module docstring building `region` of W into `out` (indexed [row, col] of
    W), the local buffers it allocates)."""
    words = tirx.decl_buffer((scatter.vector,), str(stored[scatter.words].dtype), name="scatter_words", scope="local")

    def fill(index: tirx.PrimExpr) -> tirx.Stmt:
        return _zero_fill(out, region, threads.count, index)

    def place(index: tirx.PrimExpr) -> tirx.Stmt:
        return _scatter(scatter, stored, out, region, threads.count, index, words)

    if threads.count == 1:
        return threads.wrap(lambda index: tirx.SeqStmt([fill(index), place(index)])), [words]
    # One loop nest over two phases (one statement: the software pipeline takes it as one step):
    # every thread fills (then waits at the barrier, on the GPU), then every thread scatters. The CPU
    # replay runs threads one after another, so the phase loop alone keeps fills before scatters.
    phase = tirx.Var("phase", "int32")

    def first_fill(index: tirx.PrimExpr) -> tirx.Stmt:
        filled = fill(index) if threads.barrier is None else tirx.SeqStmt([fill(index), threads.barrier()])
        return tirx.IfThenElse(phase == 0, filled, place(index))

    both = threads.wrap(first_fill)
    return tirx.For(phase, 0, 2, tirx.ForKind.SERIAL, both), [words]


def _zero_fill(out: tirx.Buffer, region: ScatterRegion, count: int, index: tirx.PrimExpr) -> tirx.Stmt:
    lanes = ZERO_LANES if region.cols % ZERO_LANES == 0 else 1
    per_row = region.cols // lanes
    total = region.rows * per_row
    i = tirx.Var("fill", "int32")
    element = index + i * count
    row, col = region.row0 + element // per_row, region.col0 + (element % per_row) * lanes
    zero = tirx.const(0, out.dtype)
    value = zero if lanes == 1 else tirx.Broadcast(zero, lanes)
    index = col if lanes == 1 else tirx.Ramp(col, 1, lanes)
    store = tirx.BufferStore(out, value, [row, index])
    if total % count:
        store = tirx.IfThenElse(element < total, store, None)
    return tirx.For(i, 0, -(-total // count), tirx.ForKind.SERIAL, store)


def _scatter(scatter, stored, out, region: ScatterRegion, count: int, index: tirx.PrimExpr, local) -> tirx.Stmt:
    tr_size, tc_size, vec = scatter.tile_rows, scatter.tile_cols, scatter.vector
    tiles_m, tiles_k = -(-region.m // tr_size), -(-region.k // tc_size)
    along_m = -(-region.rows // tr_size)
    along_k = -(-region.cols // tc_size)  # col0 is a multiple of tc_size, or the region lies in one tile
    tiles = along_m * along_k
    per_tile = max(1, count // tiles)  # L threads share a tile
    slots = count // per_tile
    lane, slot = index % per_tile, index // per_tile

    j_step = tirx.Var("tile_step", "int32")
    j = slot + j_step * slots
    tile_row = region.row0 // tr_size + j // along_k
    tile_col = region.col0 // tc_size + j % along_k
    first, end = scatter.word_range(stored, tile_row, tile_col)
    first_var, end_var = tirx.Var("first", "int32"), tirx.Var("end", "int32")
    groups = (end_var - first_var) // vec

    g_step = tirx.Var("group_step", "int32")
    base = first_var + (lane + g_step * per_tile) * vec
    load = tirx.BufferStore(local, stored[scatter.words][tirx.Ramp(base, 1, vec)], [tirx.Ramp(0, 1, vec)])
    stores = []
    for e in range(vec):
        r, c, value = scatter.element(local[e])
        # r, c wrapped into the tile (a no-op for every word a packer writes): the stores then provably
        # stay in the tiles the region covers, so TVM compacts the shared W buffer to the CTA's tile
        row, col = tile_row * tr_size + tirx.floormod(r, tr_size), tile_col * tc_size + tirx.floormod(c, tc_size)
        inside = tirx.all(
            region.row0 <= row, row < region.row0 + region.rows, region.col0 <= col, col < region.col0 + region.cols
        )
        stores.append(tirx.IfThenElse(inside, tirx.BufferStore(out, value.astype(out.dtype), [row, col]), None))
    group_count = tirx.max((groups - lane + per_tile - 1) // per_tile, 0)
    groups_loop = tirx.For(g_step, 0, group_count, tirx.ForKind.SERIAL, tirx.SeqStmt([load, *stores]))
    tile_body = tirx.SeqStmt([tirx.LetStmt(first_var, first), tirx.LetStmt(end_var, end), groups_loop])
    in_grid = tirx.all(j < tiles, tile_row < tiles_m, tile_col < tiles_k)
    if slots * per_tile < count:
        in_grid = tirx.all(in_grid, slot < slots)
    tiles_loop = tirx.For(j_step, 0, -(-tiles // slots), tirx.ForKind.SERIAL, tirx.IfThenElse(in_grid, tile_body, None))
    return tiles_loop


def cuda_barrier() -> tirx.Stmt:
    """__syncthreads(): every thread of the CTA has stored its part of the previous phase."""
    return tirx.Evaluate(tirx.call_intrin("int32", "tirx.tvm_storage_sync", "shared"))


def cuda_threads(extents: list[tuple[str, int]]) -> ScatterThreads:
    """The CTA's threads: one thread-bound loop per (tag, extent), outermost first (the last tag
    fastest in the flat index), phases separated by __syncthreads()."""
    count = 1
    for _, extent in extents:
        count *= extent

    def wrap(body_of: Callable[[tirx.PrimExpr], tirx.Stmt]) -> tirx.Stmt:
        loop_vars = [tirx.Var(tag.replace(".", "_"), "int32") for tag, _ in extents]
        flat: tirx.PrimExpr = tirx.const(0, "int32")
        for var, (_, extent) in zip(loop_vars, extents, strict=True):
            flat = flat * extent + var
        stmt = body_of(flat)
        for var, (tag, extent) in reversed(list(zip(loop_vars, extents, strict=True))):
            binding = tirx.IterVar(tvm.ir.Range(0, extent), var, tirx.IterVar.ThreadIndex, tag)
            stmt = tirx.For(var, 0, extent, tirx.ForKind.THREAD_BINDING, stmt, binding)
        return stmt

    return ScatterThreads(count, wrap, cuda_barrier)
