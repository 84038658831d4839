"""Decode a packed W straight into the registers of the mma B fragments (no fp16 W tile, no ldmatrix).

For a decode stage that offers fragment decode (`fragment_k`, `schedules/decode_stage.py`), the
template moves W like this (FP6 shown):

    global memory        plane4 [M, Kp/8] words, plane2 [M, Kp/16] words        (compressed: 6 bits a weight)
        │  cp.async, 16 B a lane, `stages` K tiles in flight
        ▼
    shared memory        plane4 tile [block_m, block_k/8 (+4 pad)]  plane2 tile [block_m, block_k/16]
        │  per warp, per unit of 16 rows × fragment_k (32) k, per lane 4g + t:
        │    LDS the words it needs (FP6: plane4 word t and plane2 word t/2 of rows g and g + 8)
        │    fragment_pair(row, col) for its 8 (row, col) pairs: funnel shifts + masks, 2 weights an op
        ▼
    registers            B fragments: 2 tiles × 4 32-bit registers a lane (fp16 patterns h = W / row_scale)
        │  mma.sync.m16n8k16 with the A fragments (X, by ldmatrix from its own swizzled shared tile)
        ▼
    fp32 accumulators ──▶ epilogue: Y[n, m] = acc[n, m] · row_scale(m) (+ bias)   (one fp32 multiply an output)

bitmap (a sparse format, `compiler/formats/bitmap.py`) takes the same path with a unit of 16 rows x 64
k (one format tile along K):

    global memory        bits [TM, TK, 32] words        offsets [TM, TK]        values [V] fp16
        │  cp.async (bits only)                             │ LDG                   │ LDG (data-dependent)
        ▼                                                   │                       │
    shared memory        bits tile [block_m / 16, block_k / 64, 32]                 │
        │  per lane 4g + t, per unit (its rows g and g + 8, bound once: `bind`):    │
        │    LDS its rows' 4 words, 4 POPC: the counts c(g), c(g + 8), packed c(g) | c(g + 8) << 16
        │    scan across the warp: 3 SHFL.UP (by 4, 8, 16 lanes: groups g - 1, g - 2, g - 4) and
        │      adds, minus its own: the rows above g | above g + 8 among 8 .. 15; + rows 0..7's total
        │      (SHFL from lane 28) for g + 8: each row's rank without counting any other row
        │  per pair (col, col + 1): rank + POPC(word below col), LDG values[rank], values[rank + 1],
        │    each kept where its bit is set (the second's value is the first's when the first is 0)
        ▼
    registers            B fragments (fp16 values)  ──▶ mma, as above (no row scale)

    the scan (`_rows_above`, the stage's `fragment_row_count` a row), lanes 4g (t = 1..3 alike):
        lane       0      4      8     ...    28
        packed     c0|c8  c1|c9  c2|c10 ...   c7|c15
        inclusive  Σ0..0  Σ0..1  Σ0..2  ...   Σ0..7      (low and high halves summed apart)
        rows above row g = inclusive - own (low half); row g + 8: high half + lane 28's low half

Every pair of a unit is decoded into registers ("decoded") before the first is stored into the
fragment, and what pairs share goes through the stage's `bind` (registers computed once a unit, equal
values bound by several pairs one register): nvcc shares nothing between pairs across a store through
the fragment's pointer, and TVM lowers a select of loads to a branch, across which nothing is shared
either (bitmap's row ranks were recomputed for every pair: 38 instructions a weight; 13.8 with `bind`).
Values lanes exchange (the scan) are lane registers of the writer's (`FragmentWriter.lane_register`):
on the GPU one register a lane read by warp shuffles, each shuffle stored to a register before any
select uses it (a shuffle under `?:` would run in some lanes only); in the replay a [32] array, each
phase of the exchange its own serial lane loop, so a lane reads what every lane wrote before.

How it is put in the schedule. The template schedules W like any operand read into fragments: a
cache_read into the fragment scope, laid out by `fragments.b_warp_layout`, computed once per unit
of fragment_k columns, with the stage's per-element decode (the PrimFunc's "decode" block) inlined
into it and reading the staged tiles. It blockizes one unit (16 rows × fragment_k columns:
fragment_k / 16 B tiles) and then `install_fragment_decode` replaces that block's body with the
per-lane pair decode: for each lane and register pair, the (col, k) that `PairAddressing` says the
register holds becomes (row, col) of W, and `stage.fragment_pair` gives its two fp16 patterns, which
the `FragmentWriter` of the intrinsic set stores (a register move on the GPU, two fp16 stores in the
CPU replay); the stage reads the stored buffers, the staged ones by their shared copies. The block
keeps its signature (iterators, read and write regions), so everything the
lowering derives from it (software pipeline, buffer compaction) is unchanged; the fragment is bound
as a match buffer, like a tensorized ldmatrix, so its register offsets follow the compaction.

This is a tensorization whose intrinsic is generated per format: TVM's `tensorize` cannot take it,
as it compares the block with a fixed description index expression by index expression, and a
format's field positions depend on the column in ways it cannot match. The replay checks the result
against numpy instead (`tests/schedules/tensorcore/test_fpx_replay.py`, `test_bitmap_fragment_decode.py`).
"""

from __future__ import annotations

import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir import Range
from tvm.s_tir.stmt import MatchBufferRegion, SBlock
from tvm.sym.analyzer import Analyzer

from tensorpress.schedules.decode_stage import DecodeStage
from tensorpress.schedules.tensorcore.intrinsics import PAIRS_PER_TILE, FragmentWriter
from tensorpress.schedules.tensorcore.tile_config import MMA_TILE, WARP_SIZE


def install_fragment_decode(
    sch: s_tir.Schedule, unit, stage: DecodeStage, stored: list, writer: FragmentWriter
) -> s_tir.Schedule:
    """A new schedule of `sch.mod` in which the blockized unit block `unit` (writing B fragment
    tiles [row tile, k tiles, 32, 8]) decodes with `stage.fragment_pair` from `stored` (the stored
    buffers in order, each staged one replaced by its shared copy)."""
    old = sch.get(unit)
    new = _fragment_decode_block(old, stage, stored, writer)
    mod = tvm_ffi.structural_map(sch.mod, (SBlock, lambda block: new if block.same_as(old) else block))
    return s_tir.Schedule(mod)


def _fragment_decode_block(old: SBlock, stage: DecodeStage, stored: list, writer: FragmentWriter) -> SBlock:
    (write,) = old.writes
    *_, row_tile, k_tiles, lanes, slots = write.region
    tiles = int(k_tiles.extent)
    if int(lanes.extent) != WARP_SIZE or int(slots.extent) != 2 * PAIRS_PER_TILE or int(row_tile.extent) != 1:
        raise ValueError(f"internal: a fragment-decode unit writes one row tile of [32, 8] B tiles, not {write}")
    fragment = tirx.decl_buffer(
        (tiles, WARP_SIZE, 2 * PAIRS_PER_TILE),
        "float16",
        name="fragment",
        scope=write.source.scope(),
        offset_factor=16,
    )
    lane = tirx.Var("lane", "int32")
    # Every pair decoded into registers before the first fragment store, and what pairs share (a
    # stage's `bind`: a row's rank) computed once into a register: nvcc shares work between pairs
    # only with no store through the fragment's pointer between them, and TVM lowers a select of
    # loads to a branch, across which nothing is shared.
    decoded = tirx.decl_buffer((tiles * PAIRS_PER_TILE,), "uint32", name="decoded", scope="local")
    computed: list = []  # the bound values' and the pairs' register stores, in order
    registers = [decoded]
    bound: list = []  # (value, its register)

    analyzer = Analyzer()  # one spelling of equal values: (16 t + g + 8 p) // 16 differs per pair p
    analyzer.bind(lane, Range(0, WARP_SIZE))
    for iter_var in old.iter_vars:
        analyzer.bind(iter_var.var, iter_var.dom)

    def bind(name: str, value):
        value = analyzer.simplify(value)
        for earlier, register in bound:
            if tvm_ffi.structural_equal(earlier, value):
                return tirx.BufferLoad(register, [0])
        register = tirx.decl_buffer((1,), str(value.ty), name=name, scope="local")
        registers.append(register)
        bound.append((value, register))
        computed.append(tirx.BufferStore(register, value, [0]))
        return tirx.BufferLoad(register, [0])

    rows_above = None
    setup: list = []
    scan: list = []
    if stage.fragment_counts_rows:
        row0, col0 = row_tile.min * MMA_TILE, k_tiles.min * MMA_TILE
        rows_above, scan = _rows_above(stage, stored, writer, lane, row0, col0, bind, registers)
        setup = list(computed)  # the lane's rows' registers, which the scan and the pairs read
        computed.clear()

    stores = []
    for tile in range(tiles):
        for pair in range(PAIRS_PER_TILE):
            col_in_tile, k_in_tile = writer.addressing.pair_element(lane, pair)
            row = row_tile.min * MMA_TILE + col_in_tile  # a B tile's "cols" are W's rows
            col = (k_tiles.min + tile) * MMA_TILE + k_in_tile
            slot = tile * PAIRS_PER_TILE + pair
            if rows_above is None:
                value = stage.fragment_pair(stored, row, col, bind)
            else:
                above = _lane_row_value(analyzer, rows_above, col_in_tile, lane)
                value = stage.fragment_pair(stored, row, col, bind, rows_above=above)
            computed.append(tirx.BufferStore(decoded, value, [slot]))
            stores.append(writer.store_pair(fragment, tile, lane, pair, tirx.BufferLoad(decoded, [slot])))
    body = (
        writer.lane_phases(lane, setup, [*scan[:-1], [*scan[-1], *computed, *stores]])
        if scan
        else writer.lane_loop(lane, tirx.SeqStmt([*computed, *stores]))
    )
    return SBlock(
        old.iter_vars,
        old.reads,
        old.writes,
        old.name_hint,
        body,
        alloc_buffers=registers,
        match_buffers=[MatchBufferRegion(fragment, write)],
        annotations=old.annotations,
    )


ROW_SCAN_DELTAS = (4, 8, 16)  # lanes 4g .. 4g + 3 hold rows g and g + 8: a scan over g in 3 shuffle steps
ROW_HALF_BITS = 16  # the two rows' counts travel as one 32-bit value (a unit's sums stay below 2^16)


def _rows_above(stage: DecodeStage, stored: list, writer: FragmentWriter, lane, row0, col0, bind, registers: list):
    """({0: rows above row g, 8: rows above row g + 8} of lane 4g + t, the scan's phases): the sums
    of `stage.fragment_row_count` over the unit's rows before each of the lane's two rows, by an
    inclusive scan over the warp's row groups (shuffles up by 4, 8, 16 lanes) of both counts packed in
    one word, then the rows 0..7's total (lane 28's) added to the upper rows'. No lane recounts another
    row: a row's count once a unit, its rank from the scan (bitmap: 15 row popcounts a lane before)."""
    g = lane // 4
    half = tirx.const(ROW_HALF_BITS, "uint32")
    low_mask = tirx.const((1 << ROW_HALF_BITS) - 1, "uint32")
    counts = [stage.fragment_row_count(stored, row0 + g + 8 * h, col0, bind).astype("uint32") for h in range(2)]
    step = writer.lane_register("row_counts")
    registers.append(step)
    phases = [[tirx.BufferStore(step, counts[0] | (counts[1] << half), writer.own(step, lane))]]
    first = step
    for delta in ROW_SCAN_DELTAS:
        # the shuffle into a register of its own: under a select only some lanes would run it
        up = tirx.decl_buffer((1,), "uint32", name=f"rows_up{delta}", scope="local")
        following = writer.lane_register(f"rows_scan{delta}")
        registers += [up, following]
        taken = (lane >= delta).astype("uint32")
        own = tirx.BufferLoad(step, writer.own(step, lane))
        phases.append(
            [
                tirx.BufferStore(up, writer.read_up(step, lane, delta), [0]),
                tirx.BufferStore(following, own + tirx.BufferLoad(up, [0]) * taken, writer.own(following, lane)),
            ]
        )
        step = following
    low_total = tirx.decl_buffer((1,), "uint32", name="rows_low_total", scope="local")
    registers.append(low_total)
    last_group = 4 * (MMA_TILE // 2 - 1)  # lane 28: rows 0 .. 7 inclusive in its low half
    phases.append([tirx.BufferStore(low_total, writer.read_lane(step, last_group) & low_mask, [0])])
    exclusive = tirx.BufferLoad(step, writer.own(step, lane)) - tirx.BufferLoad(first, writer.own(first, lane))
    above = {
        0: (exclusive & low_mask).astype("int32"),
        8: ((exclusive >> half) + tirx.BufferLoad(low_total, [0])).astype("int32"),
    }
    return above, phases


def _lane_row_value(analyzer: Analyzer, values: dict, col_in_tile, lane):
    """values[0] or values[8]: the one for the row `col_in_tile` (lane // 4 or lane // 4 + 8)."""
    for offset, value in values.items():
        if analyzer.can_prove_equal(col_in_tile, lane // 4 + offset):
            return value
    raise ValueError(f"internal: a row scan needs lane 4g + t to hold rows g and g + 8, not {col_in_tile}")
