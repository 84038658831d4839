"""The register-blocked GEMM schedule that the weight-GEMM and matmul rules share.

A GEMM block here has loops [*batch, rows, cols, k] and computes

    C[b, r, c] += A[b, r, k] * B[b, c, k]        (B is whatever block produces it: a decode, a copy)

The schedule keeps a rows x cols tile of C in vector registers (the micro-kernel), broadcasts one A
element per row and loads `cols` consecutive B values per k step, so B is first laid out as a panel
[k, cols] for the column tile being computed:

    parallel  b, c_o                     column tiles (and batches) over the cores
      B_panel[k, c_i] = B[b, c_o*C + c_i, k]      the producer of B, once per column tile
      for r_o                            row tiles
        acc[R, C] = 0                    R x C/lanes vector registers
        for k:  for r_i (unrolled R):  acc[r_i, :] += A[b, r_o*R + r_i, k] * B_panel[k, :]
        C[b, r_o*R + r_i, c_o*C + :] = epilogue(acc)     bias, cast, ... (rows past the end skipped)

Rows (tokens: symbolic) are padded up to a multiple of R with `pad_einsum` (the padded A rows are
zeros, the padded C rows are never stored), so the micro-kernel has no bounds checks; the epilogue
carries the only predicate. Columns are padded the same way when C does not divide them.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir.schedule import LoopRV, SBlockRV

from tensorpress.schedules.cpu.loop_helpers import parallelize_outer, static_extent, uses, vectorize_innermost
from tensorpress.schedules.cpu.vector_unit import VectorUnit


@dataclass(frozen=True)
class RegisterTile:
    """rows x cols of C held in registers; cols is a multiple of the vector lanes."""

    rows: int
    cols: int


def register_tile(unit: VectorUnit, dtype: str = "float32") -> RegisterTile:
    """The micro-kernel tile for `unit`: two vectors wide, as many rows as the registers allow
    (rows * 2 accumulators + 2 B vectors + 1 broadcast A value): 6 x 16 fp32 with AVX2."""
    lanes = unit.lanes(dtype)
    rows = min((unit.registers - 3) // 2, 8)
    return RegisterTile(rows=rows, cols=2 * lanes)


@dataclass(frozen=True)
class GemmBlocks:
    """The blocks of one GEMM: `gemm` (the reduction); `a_source` / `b_source`, the blocks producing
    A and B (a reindex copy, a decode), None when the operand is read straight from a buffer; and
    whether to read B in place (`inline_b`: B is already laid out with cols contiguous, e.g. a
    pre-packed weight panel, as wide as the tile or a whole fraction of it)."""

    gemm: SBlockRV
    a_source: SBlockRV | None = None
    b_source: SBlockRV | None = None
    inline_b: bool = False


def schedule_register_blocked_gemm(sch: s_tir.Schedule, blocks: GemmBlocks, tile: RegisterTile, lanes: int) -> None:
    """Apply the schedule in the module docstring to `blocks.gemm` (loops [*batch, rows, cols, k])."""
    gemm = blocks.gemm
    *batch, rows, cols, _ = sch.get_loops(gemm)
    col_extent = static_extent(sch, cols)
    tile_cols = _column_tile(col_extent, tile.cols, lanes)
    pad_cols = tile_cols if not _divides(tile_cols, col_extent) else 1
    sch.pad_einsum(gemm, [1] * len(batch) + [tile.rows, pad_cols, 1])
    a_pad, b_pad = _padding_producers(sch, gemm)

    # Each operand's source folds into its padded copy, when there is one.
    a_block = _merge_into_padded_copy(sch, blocks.a_source, a_pad)
    b_block = _merge_into_padded_copy(sch, blocks.b_source, b_pad)

    inline_b = b_block is None or (blocks.inline_b and b_pad is None)
    *batch, rows, cols, k = sch.get_loops(gemm)
    c_o, c_i = sch.split(cols, [None, tile_cols])
    r_o, r_i = sch.split(rows, [None, tile.rows])
    sch.reorder(*batch, c_o, r_o, k, r_i, c_i)
    outer = sch.fuse(*batch, c_o) if batch else c_o
    _attach_epilogue(sch, gemm, r_o, lanes)

    if b_block is not None:
        if inline_b:
            sch.compute_inline(b_block)
        else:
            _pack_panel(sch, b_block, outer, tile_cols, lanes)
    # A is read one broadcast element at a time: its source is inlined when the indexing allows,
    # else materialised once, before the GEMM (as the padded copy always is).
    if a_block is not None and (a_pad is not None or not _try_compute_inline(sch, a_block)):
        _schedule_copy(sch, a_block, lanes)

    sch.parallel(outer)
    sch.unroll(r_i)
    if blocks.inline_b and inline_b and tile_cols > lanes:
        # B read in place from stored panels narrower than the tile: one vector per step of the
        # unrolled loop, so each load stays within one panel (a 2-vector load would straddle two)
        c_v, c_i = sch.split(c_i, [None, lanes])
        sch.unroll(c_v)
    sch.vectorize(c_i)
    init = sch.decompose_reduction(gemm, k)
    sch.vectorize(sch.get_loops(init)[-1])


def _column_tile(extent: int | None, preferred: int, lanes: int) -> int:
    """The micro-kernel width: `preferred` (two vectors), or one vector when that divides the columns
    and two do not (so e.g. 40 columns need no padding)."""
    if extent is not None and extent % preferred and extent % lanes == 0:
        return lanes
    return preferred


def _divides(factor: int, extent: int | None) -> bool:
    return extent is not None and extent % factor == 0


def _try_compute_inline(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    try:
        sch.compute_inline(block)
    except s_tir.ScheduleError:
        return False
    return True


def _merge_into_padded_copy(sch: s_tir.Schedule, source: SBlockRV | None, padded: SBlockRV | None):
    """The one block left producing an operand: the padded copy with `source` inlined into it."""
    if padded is None:
        return source
    if source is not None:
        sch.compute_inline(source)
    return padded


def _padding_producers(sch: s_tir.Schedule, gemm: SBlockRV) -> tuple[SBlockRV | None, SBlockRV | None]:
    """The blocks pad_einsum put in front of the GEMM: (padded A copy, padded B copy), each None when
    that operand needed no padding (pad_einsum names the buffers it adds `<name>_pad`)."""
    reads = [region.source.name for region in sch.get(gemm).reads]
    written = {sch.get(p).writes[0].source.name: p for p in sch.get_producers(gemm)}
    a_name, b_name = reads[0], reads[1]
    a_pad = written.get(a_name) if a_name.endswith("_pad") else None
    b_pad = written.get(b_name) if b_name.endswith("_pad") else None
    return a_pad, b_pad


def _attach_epilogue(sch: s_tir.Schedule, gemm: SBlockRV, row_tile: LoopRV, lanes: int) -> None:
    """Accumulate in a local (register) tile, and finish each tile where it is computed: everything
    elementwise after the GEMM (the copy out of the padded buffer, bias, casts) becomes one block that
    writes C straight from the registers.

    That needs each tile to be a rectangle of C. When the rows of the GEMM fuse several axes of C
    (x[b, s, k] @ w[k, m] has rows b*s), a tile of rows can wrap from one b to the next, which
    TVM's region analysis over-approximates into wrong loops; then the tile is stored to the padded
    buffer and the epilogue runs afterwards over all of C."""
    write_back = sch.cache_write(gemm, 0, "local")
    trial = sch.copy()
    if _reads_register_tile_directly(trial, _inline_forward(trial, write_back)):
        epilogue = _inline_forward(sch, write_back)
        sch.reverse_compute_at(epilogue, row_tile)
        vectorize_innermost(sch, epilogue, lanes)
        return
    sch.reverse_compute_at(write_back, row_tile)
    vectorize_innermost(sch, write_back, lanes)
    consumers = sch.get_consumers(write_back)
    if len(consumers) == 1:
        epilogue = _inline_forward(sch, consumers[0])
        loops = sch.get_loops(epilogue)
        parallelize_outer(sch, loops[:-1], work_per_iteration=static_extent(sch, loops[-1]) or lanes)
        vectorize_innermost(sch, epilogue, lanes)


def _inline_forward(sch: s_tir.Schedule, block: SBlockRV) -> SBlockRV:
    """Fold `block` into its consumer, and that into its consumer, while each has exactly one and
    TVM allows it; return the block left at the end of the chain. (Forward only: each consumer keeps
    its own unpadded domain, where reverse_compute_inline would give it the padded one and store
    the padding rows past the end of C.)"""
    while True:
        consumers = sch.get_consumers(block)
        if len(consumers) != 1 or not _try_compute_inline(sch, block):
            return block
        block = consumers[0]


def _reads_register_tile_directly(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """Whether `block` reads the local accumulator with one of its own iterators per row and column."""
    for region in sch.get(block).reads:
        if region.source.scope() == "local":
            rows, cols = region.region[-2].min, region.region[-1].min
            return isinstance(rows, tirx.Var) and isinstance(cols, tirx.Var)
    return False


def _pack_panel(sch: s_tir.Schedule, block: SBlockRV, outer, tile_cols: int, lanes: int) -> None:
    """Compute the B producer once per column tile, into a [k, cols] panel (cols contiguous)."""
    contiguous = _reads_contiguous_along_cols(sch, block)
    sch.compute_at(block, outer)
    ndim = len(sch.get(block).writes[0].source.shape)
    sch.transform_layout(
        block,
        ("write", 0),
        lambda *idx: (*idx[: ndim - 2], idx[-2] // tile_cols, idx[-1], idx[-2] % tile_cols),
    )
    *_, col, k = sch.get_loops(block)
    sch.reorder(k, col)
    if contiguous:
        vectorize_innermost(sch, block, lanes)


def _reads_contiguous_along_cols(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """True when every buffer the B producer reads has the column index in its last dimension, so
    loading consecutive columns is a contiguous vector load (a [K, M] matrix; not an [M, K] one)."""
    stmt = sch.get(block)
    col = stmt.writes[0].region[-2].min
    if not isinstance(col, tirx.Var):
        return False
    return bool(stmt.reads) and all(uses(r.region[-1].min, col) for r in stmt.reads)


def _schedule_copy(sch: s_tir.Schedule, block: SBlockRV, lanes: int) -> None:
    """A copy at the root (the padded A): rows over the cores, the last axis in vectors."""
    loops = sch.get_loops(block)
    parallelize_outer(sch, loops[:-1], work_per_iteration=static_extent(sch, loops[-1]) or lanes)
    vectorize_innermost(sch, block, lanes)
