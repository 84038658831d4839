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

Bitmap words (`TileScatter.set_bits`: bitmap, bitmap x FPx; `_BitScatter`): a group is `vector` words
(bitmap: 2, one tile row, one 64-bit load), L is at most the tile's groups (no lane without one), and

    1. zero-fill + counts   as above, and each thread stores the set bits of each of its groups:
                              counts[tile j, group g] = popcount(w[0]) + ... (shared memory, int32)
    2. barrier
    3. scatter              rank = first_index(tile) + counts[j, 0 .. g - 1] (masked sum, no branch)
                            each word w[e] inside the region: its set bits, lowest first, C = chunk
                              at a time (a loop of ceil(popcount(w) / C) trips, t = 0, 1, ...):
                                m_0 = m, m_(j+1) = m_j & (m_j - 1)   (m: the bits not yet stored)
                                b_j = popcount(~m_j & (m_j - 1))     (the lowest set bit of m_j)
                                out[row of word, 32 (its column) + b_j] = value(rank + C t + j)
                                  for j < C where m_j != 0 (j = 0 always); m = m_C
                              (the values of a trip from `SetBits.values` when the stage has it: one
                               window of the code stream for the C codes; a missing bit's store is
                               skipped, or with `redirect_missing` sent to b_0's position before b_0's
                               own store: no branch); rank += popcount(w)
                            (one thread a tile, as the CPU's one thread: no counts, a running rank)

      a tile's 16 rows, 2 words each:   row r: │ word 2r (cols 0..31) │ word 2r + 1 (cols 32..63) │
      lane r of the tile's 16 takes row r; its first nonzero's index = offsets[tile] + the set bits of
      rows 0 .. r - 1, which the 16 lanes counted before the barrier

The counts buffer is allocated above the phase loop (a block's buffer goes where its uses meet, inside
the loop, where the CPU replay would poison it again between the phases).

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
WORD_BITS = 32  # positions a bitmap word marks


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
    W), the local and shared buffers it allocates)."""
    words = tirx.decl_buffer((scatter.vector,), str(stored[scatter.words].dtype), name="scatter_words", scope="local")
    deal = Dealing(scatter, region, threads.count)
    bits = _BitScatter(scatter, stored, out, region, deal, words) if scatter.set_bits is not None else None

    def fill(index: tirx.PrimExpr) -> tirx.Stmt:
        zero = _zero_fill(out, region, threads.count, index)
        return zero if bits is None or bits.counts is None else tirx.SeqStmt([zero, bits.count_groups(index)])

    def place(index: tirx.PrimExpr) -> tirx.Stmt:
        if bits is not None:
            return bits.place(index)
        return _scatter(scatter, stored, out, region, deal, index, words)

    local = [words] if bits is None else [words, *bits.buffers]
    if threads.count == 1:
        return threads.wrap(lambda index: tirx.SeqStmt([fill(index), place(index)])), local

    # One loop nest over two phases (one statement: the software pipeline takes it as one step):
    # every thread fills (then waits at the barrier, on the GPU), then every thread scatters. The CPU
    # replay runs threads one after another, so the phase loop alone keeps fills before scatters.
    def filled(index: tirx.PrimExpr) -> tirx.Stmt:
        return fill(index) if threads.barrier is None else tirx.SeqStmt([fill(index), threads.barrier()])

    phase = tirx.Var("phase", "int32")

    def first_fill(index: tirx.PrimExpr) -> tirx.Stmt:
        return tirx.IfThenElse(phase == 0, filled(index), place(index))

    both = tirx.For(phase, 0, 2, tirx.ForKind.SERIAL, threads.wrap(first_fill))
    if bits is not None and bits.counts is not None:
        # allocated here, above the phase loop: a block's buffer would be allocated where its uses meet,
        # inside the phase loop, and the replay would poison the counts again between the phases
        allocated = tirx.SeqStmt([tirx.AllocBuffer(bits.counts), both])
        return tirx.AttrStmt(bits.counts.data, "tensorpress.scatter_counts", 0, allocated), local
    return both, local


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


@dataclass(frozen=True)
class _Group:
    """One group of `vector` words a thread loads: its tile (tile_row, tile_col; `tile` its index among
    the region's tiles), its index in the tile and the flat index of its first word (`first` the tile's)."""

    tile_row: tirx.PrimExpr
    tile_col: tirx.PrimExpr
    tile: tirx.PrimExpr
    group: tirx.PrimExpr
    base: tirx.PrimExpr
    first: tirx.PrimExpr


class Dealing:
    """How the region's tiles and their groups of words are dealt to the threads (module docstring, 3)."""

    def __init__(self, scatter: TileScatter, region: ScatterRegion, count: int):
        self.scatter, self.region, self.count = scatter, region, count
        tr_size, tc_size = scatter.tile_rows, scatter.tile_cols
        self.tiles_m, self.tiles_k = -(-region.m // tr_size), -(-region.k // tc_size)
        self.along_m = -(-region.rows // tr_size)
        self.along_k = -(-region.cols // tc_size)  # col0 is a multiple of tc_size, or the region lies in one tile
        self.tiles = self.along_m * self.along_k
        self.per_tile = max(1, count // self.tiles)  # L threads share a tile
        if scatter.set_bits is not None:  # a bitmap tile has a known number of groups: no lane without one
            self.per_tile = min(self.per_tile, tr_size * tc_size // WORD_BITS // scatter.vector)
        self.slots = count // self.per_tile

    def tiles_of(self, thread: int) -> list[int]:
        """(Python ints) the region's tiles thread `thread` takes, one a tile step, in order; it takes
        groups lane_of(thread), + per_tile, ... of each."""
        slot = thread // self.per_tile
        return list(range(slot, self.tiles, self.slots)) if slot < self.slots else []

    def lane_of(self, thread: int) -> int:
        return thread % self.per_tile

    def loops(self, stored, index: tirx.PrimExpr, tile_start, group_body) -> tirx.Stmt:
        """For each tile of thread `index`: tile_start(tile_row, tile_col) (statements, before its
        groups), then group_body(_Group) for each of its groups of words."""
        scatter, region, vec = self.scatter, self.region, self.scatter.vector
        per_tile, slots = self.per_tile, self.slots
        lane, slot = index % per_tile, index // per_tile
        j_step = tirx.Var("tile_step", "int32")
        j = slot + j_step * slots
        tile_row = region.row0 // scatter.tile_rows + j // self.along_k
        tile_col = region.col0 // scatter.tile_cols + j % self.along_k
        first, end = scatter.word_range(stored, tile_row, tile_col)
        first_var, end_var = tirx.Var("first", "int32"), tirx.Var("end", "int32")
        groups = (end_var - first_var) // vec
        g_step = tirx.Var("group_step", "int32")
        group = lane + g_step * per_tile
        base = first_var + group * vec
        body = group_body(_Group(tile_row, tile_col, j, group, base, first_var))
        group_count = tirx.max((groups - lane + per_tile - 1) // per_tile, 0)
        groups_loop = tirx.For(g_step, 0, group_count, tirx.ForKind.SERIAL, body)
        tile_body = tirx.SeqStmt(
            [tirx.LetStmt(first_var, first), tirx.LetStmt(end_var, end), *tile_start(tile_row, tile_col), groups_loop]
        )
        in_grid = tirx.all(j < self.tiles, tile_row < self.tiles_m, tile_col < self.tiles_k)
        if slots * per_tile < self.count:
            in_grid = tirx.all(in_grid, slot < slots)
        steps = -(-self.tiles // slots)
        return tirx.For(j_step, 0, steps, tirx.ForKind.SERIAL, tirx.IfThenElse(in_grid, tile_body, None))


def _scatter(scatter, stored, out, region: ScatterRegion, deal: Dealing, index: tirx.PrimExpr, local) -> tirx.Stmt:
    """A word per element: each loaded word's value stored at its (row, col)."""
    tr_size, tc_size, vec = scatter.tile_rows, scatter.tile_cols, scatter.vector

    def group_body(g: _Group) -> tirx.Stmt:
        load = tirx.BufferStore(local, _load_words(stored[scatter.words], g.base, vec), [tirx.Ramp(0, 1, vec)])
        stores = []
        for e in range(vec):
            r, c, value = scatter.element(local[e])
            # r, c wrapped into the tile (a no-op for every word a packer writes): the stores then provably
            # stay in the tiles the region covers, so TVM compacts the shared W buffer to the CTA's tile
            row = g.tile_row * tr_size + tirx.floormod(r, tr_size)
            col = g.tile_col * tc_size + tirx.floormod(c, tc_size)
            inside = tirx.all(
                region.row0 <= row, row < region.row0 + region.rows, region.col0 <= col, col < region.col0 + region.cols
            )
            stores.append(tirx.IfThenElse(inside, tirx.BufferStore(out, value.astype(out.dtype), [row, col]), None))
        return tirx.SeqStmt([load, *stores])

    return deal.loops(stored, index, lambda *_: [], group_body)


def _load_words(buffer: tirx.Buffer, flat: tirx.PrimExpr, lanes: int) -> tirx.PrimExpr:
    """Words flat .. flat + lanes - 1 of `buffer` read as flat, row-major (one vector load: flat is a
    multiple of lanes, and so is the buffer's last extent)."""
    if len(buffer.shape) == 1:
        return buffer[tirx.Ramp(flat, 1, lanes)]
    indices, rest = [], flat
    for extent in reversed([int(e) for e in buffer.shape[1:]]):
        indices.append(rest % extent)
        rest = rest // extent
    indices.append(rest)
    indices.reverse()
    indices[-1] = tirx.Ramp(indices[-1], 1, lanes)
    return buffer[tuple(indices)]


class _BitScatter:
    """Bitmap words (`TileScatter.set_bits`): per loaded word, a loop over its set bits, lowest first,
    `chunk` a trip (the module docstring).

    rank of a group's first element = first_index(tile) + the set bits of the tile's groups before
        L threads a tile (L > 1): each group's count stored in shared memory (`counts`, in the
        fill phase, before the barrier), the groups before summed (masked: no branch)
        one thread a tile: a running rank over its groups, in order
    word w at tile word i (positions 32 i ..): inside the region -> for t < popcount(w):
        bit = popcount(~m & (m - 1)) (the lowest set bit of m, initially w), m &= m - 1
        out[row of 32 i, column of 32 i + bit] = value(rank + t)
    rank += popcount(w)
    """

    def __init__(self, scatter: TileScatter, stored, out, region: ScatterRegion, deal: Dealing, words):
        assert scatter.set_bits is not None and scatter.tile_cols % WORD_BITS == 0
        self.scatter, self.bits, self.stored, self.out, self.region, self.deal = (
            scatter, scatter.set_bits, stored, out, region, deal,
        )  # fmt: skip
        self.words = words
        self.groups_per_tile = scatter.tile_rows * scatter.tile_cols // WORD_BITS // scatter.vector
        self.rank = tirx.decl_buffer((1,), "int32", name="scatter_rank", scope="local")
        self.mask = tirx.decl_buffer((1,), "uint32", name="scatter_mask", scope="local")
        self.counts = None
        if deal.per_tile > 1:
            shape = (deal.tiles, self.groups_per_tile)
            self.counts = tirx.decl_buffer(shape, "int32", name="scatter_counts", scope="shared")
        self.buffers = [self.rank, self.mask]  # the block's; the counts are allocated by the statement

    def _load(self, g: _Group) -> tirx.Stmt:
        vec = self.scatter.vector
        value = _load_words(self.stored[self.scatter.words], g.base, vec)
        return tirx.BufferStore(self.words, value, [tirx.Ramp(0, 1, vec)])

    def _popcount(self, e: int) -> tirx.PrimExpr:
        return tirx.popcount(self.words[e]).astype("int32")

    def count_groups(self, index: tirx.PrimExpr) -> tirx.Stmt:
        """The fill phase's part: counts[tile, group] = the set bits of each group the thread deals with."""
        assert self.counts is not None

        def group_body(g: _Group) -> tirx.Stmt:
            total = group_popcount([self.words[e] for e in range(self.scatter.vector)])
            return tirx.SeqStmt([self._load(g), tirx.BufferStore(self.counts, total, [g.tile, g.group])])

        return self.deal.loops(self.stored, index, lambda *_: [], group_body)

    def place(self, index: tirx.PrimExpr) -> tirx.Stmt:
        first_index = self.bits.first_index

        def tile_start(tile_row, tile_col) -> list:
            if self.counts is not None:
                return []
            return [tirx.BufferStore(self.rank, first_index(self.stored, tile_row, tile_col), [0])]

        def group_body(g: _Group) -> tirx.Stmt:
            stmts = [self._load(g)]
            if self.counts is not None:  # the groups before this one, from the fill phase's counts
                rank = first_index(self.stored, g.tile_row, g.tile_col)
                for before in range(self.groups_per_tile - 1):
                    earlier = (tirx.const(before, "int32") < g.group).astype("int32")
                    rank = rank + self.counts[g.tile, before] * earlier
                stmts.append(tirx.BufferStore(self.rank, rank, [0]))
            for e in range(self.scatter.vector):
                stmts.append(self._word(g, e))
                stmts.append(tirx.BufferStore(self.rank, self.rank[0] + self._popcount(e), [0]))
            return tirx.SeqStmt(stmts)

        return self.deal.loops(self.stored, index, tile_start, group_body)

    def _word(self, g: _Group, e: int) -> tirx.Stmt:
        """The set bits of word e of group g stored at their positions, when the word is in the region:
        `chunk` bits a loop trip, the trip's values at ranks rank + chunk t .. (`_chunk_values`)."""
        scatter, region, out = self.scatter, self.region, self.out
        chunk = self.bits.chunk
        one = tirx.const(1, "uint32")
        position = (g.base - g.first + e) * WORD_BITS  # of the word's bit 0 in its tile
        row = g.tile_row * scatter.tile_rows + tirx.floormod(position // scatter.tile_cols, scatter.tile_rows)
        inside = tirx.all(
            region.row0 <= row,
            row < region.row0 + region.rows,
            region.col0 <= g.tile_col * scatter.tile_cols + position % scatter.tile_cols,
            g.tile_col * scatter.tile_cols + position % scatter.tile_cols < region.col0 + region.cols,
        )
        t = tirx.Var("set_bit", "int32")
        lets: list[tuple[tirx.Var, tirx.PrimExpr]] = []

        def bind(name: str, value: tirx.PrimExpr) -> tirx.Var:
            var = tirx.Var(f"chunk_{name}", str(value.ty))
            lets.append((var, value))
            return var

        # bit j of the trip: the lowest set bit of masks[j] (the word's mask with j more bits cleared);
        # it exists when masks[j] != 0 (always for j = 0: the trip count is ceil(bits / chunk))
        masks = [self.mask[0]]
        for j in range(1, chunk + 1):
            cleared = masks[-1] & (masks[-1] - one)
            masks.append(bind(f"mask{j}", cleared) if j < chunk else cleared)
        rank = self.rank[0] + t * chunk
        exists = [masks[j] != tirx.const(0, "uint32") for j in range(chunk)]
        values = self._chunk_values(rank, exists, bind)

        def column(j: int) -> tirx.PrimExpr:
            # wrapped into the tile (a no-op): stores provably stay in the region's tiles (compaction)
            bit = lowest_set_bit(masks[j])
            return g.tile_col * scatter.tile_cols + tirx.floormod(position % scatter.tile_cols + bit, scatter.tile_cols)

        stores: list[tirx.Stmt] = []
        if self.bits.redirect_missing:
            # branch-free: a missing bit's store goes to the trip's first bit's position (selected), which
            # the first bit's own store, last, overwrites
            for j in reversed(range(chunk)):
                col = column(j) if j == 0 else tirx.Select(exists[j], column(j), column(0))
                stores.append(tirx.BufferStore(out, values[j].astype(out.dtype), [row, col]))
        else:  # a missing bit's store skipped (nvcc predicates a load and a store)
            for j in range(chunk):
                store = tirx.BufferStore(out, values[j].astype(out.dtype), [row, column(j)])
                stores.append(store if j == 0 else tirx.IfThenElse(exists[j], store, None))
        bound = [tirx.LetStmt(var, value) for var, value in lets]  # a binding, in order, before its readers
        trip = tirx.SeqStmt([*bound, *stores, tirx.BufferStore(self.mask, masks[chunk], [0])])
        trips = chunk_trips(self._popcount(e), chunk)
        # not unrolled: nvcc's unrolled copies and remainder code cost more issue slots than the loop
        # branch saves when a warp's busiest lane has a dozen bits
        loop = tirx.For(t, 0, trips, tirx.ForKind.SERIAL, trip, annotations={"disable_unroll": 1})
        return tirx.IfThenElse(inside, tirx.SeqStmt([tirx.BufferStore(self.mask, self.words[e], [0]), loop]), None)

    def _chunk_values(self, index: tirx.PrimExpr, exists: list, bind) -> list:
        """The values of indices index .. index + len(exists) - 1, any value where its bit does not exist
        (`exists[j]`, TIR bool): the stage's `values` (work shared, read in bounds), else `value` each,
        read under the store's condition, or (redirected stores: read unconditionally) at `index` where
        the bit does not exist, in bounds."""
        if self.bits.values is not None:
            return self.bits.values(self.stored, index, len(exists), bind)
        if not self.bits.redirect_missing:
            return [self.bits.value(self.stored, index + j) for j in range(len(exists))]
        return [
            self.bits.value(self.stored, index + j if j == 0 else tirx.Select(exists[j], index + j, index))
            for j in range(len(exists))
        ]


def lowest_set_bit(mask: tirx.PrimExpr) -> tirx.PrimExpr:
    """int32 TIR: the index of the lowest set bit of the uint32 `mask` (not 0): its trailing zeros."""
    return tirx.popcount(tirx.bitwise_not(mask) & (mask - tirx.const(1, "uint32"))).astype("int32")


def chunk_trips(bits: tirx.PrimExpr, chunk: int) -> tirx.PrimExpr:
    """int32 TIR: the trips of the loop over a word's `bits` set bits, `chunk` a trip (the last may hold
    fewer)."""
    return (bits + (chunk - 1)) // chunk if chunk > 1 else bits


def group_popcount(words: list) -> tirx.PrimExpr:
    """int32 TIR: the set bits of a group's uint32 words."""
    total = tirx.popcount(words[0]).astype("int32")
    for word in words[1:]:
        total = total + tirx.popcount(word).astype("int32")
    return total


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
