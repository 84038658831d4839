"""llvm schedule of the encoder attention kernel (`schedules/encoder_attention.py`): its body written out
as a tiled program, one parallel task per (batch, head, block of QUERY_BLOCK query rows):

    task (b, h, block):
        kt[D, Sp] = k[b, :, h, :]ᵀ · k_scale        keys transposed, so q·k runs over 8 keys a vector; the
                                                   Sp - S pad columns are zeros (Sp: S up to a key tile)
        for each ROWS query rows i (rows past S are clamped to S - 1: computed twice, stored alike):
            s[ROWS, Sp] = (q_i · q_scale) · kt      register tile ROWS rows x key vectors (`Tiles`)
            per row: s = s · s_scale + mask; pads = -inf; m = max (m = -inf: every s is -inf);
                     s = exp(s - m) (vector exp, 8 lanes; m taken as 0 for an all -inf row); l = Σ s
                     (zero_nan_rows: l NaN -> s = 0, l = 1; a branch only such rows take)
            out[i] = (s · v[b, :, h, :]) / l        register tile ROWS rows x channel vectors (`Tiles`)

The scores of a row block stay in a task-local [ROWS, Sp] buffer (S <= a few hundred: L1), never in a
[B, H, S, S] tensor; the full rows make softmax exact in two passes (max, then exp and sum). Every
vector loop covers whole vectors: the pads make Sp a multiple of the key tile, and the mask's tail (S % 8
keys) is added in a scalar loop. At most 8 float32 lanes, AVX-512 included (`row_loops.MAX_LANES`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T
from tvm.target import Target

from tensorpress.schedules.cpu.row_loops import MAX_LANES
from tensorpress.schedules.cpu.vector_exp import vector_exp
from tensorpress.schedules.cpu.vector_unit import VectorUnit, vector_unit
from tensorpress.schedules.encoder_attention import AttentionBuffers, attention_buffers, config_of, kernel_func

QUERY_BLOCK = 128  # query rows per task (the keys are transposed once per task)
ROWS = 4  # query rows of a register tile


@dataclass(frozen=True)
class Tiles:
    """Register tiles: the q·k tile holds ROWS x key_vectors sums over d, the p·v tile ROWS x pv_vectors
    (at most half the vector registers: the rest hold the operands)."""

    key_vectors: int
    accumulators: int


def tiles_for(unit: VectorUnit) -> Tiles:
    """AVX2's 16 registers: 4 x 2 tiles; AVX-512's 32 (ymm still, see MAX_LANES): 4 x 4."""
    accumulators = unit.registers // 2
    return Tiles(key_vectors=accumulators // ROWS, accumulators=accumulators)


class EncoderAttention(CPUScheduleRule):
    """The encoder attention kernel, written out as the module docstring's program; None for anything else."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        config = config_of(func)
        if config is None or not self.is_target_available(target):
            return None
        lanes = min(MAX_LANES, vector_unit(target).lanes("float32"))
        if config.head_dim % lanes:
            return None
        bufs = attention_buffers(config)
        return s_tir.Schedule(kernel_func(bufs, attention_program(bufs, lanes, tiles_for(vector_unit(target)))))


def attention_program(bufs: AttentionBuffers, lanes: int, tiles: Tiles = Tiles(2, 8)) -> tirx.Stmt:
    """The module docstring's loops over `bufs` (vectors of `lanes` float32)."""
    config = bufs.config
    B, S = bufs.batch, bufs.seq
    H, D = config.heads, config.head_dim
    i64 = lambda v: tirx.const(v, "int64")  # noqa: E731
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    neg_inf = f32(float("-inf"))
    key_tile = lanes * tiles.key_vectors
    padded = tirx.floordiv(S + key_tile - 1, key_tile) * key_tile
    blocks = tirx.floordiv(S + QUERY_BLOCK - 1, QUERY_BLOCK)
    pv_vectors = min(D // lanes, max(1, tiles.accumulators // ROWS))
    while (D // lanes) % pv_vectors:
        pv_vectors -= 1

    with IRBuilder() as ib, T.parallel(i64(0), B * H * blocks) as task:
        b = T.bind(tirx.floordiv(task, H * blocks))
        h = T.bind(tirx.floormod(tirx.floordiv(task, blocks), H))
        first = T.bind(tirx.floormod(task, blocks) * QUERY_BLOCK)
        kt = T.decl_buffer((D, padded), "float32", scope="global")
        scores = T.decl_buffer((ROWS, padded), "float32", scope="global")
        with T.serial(i64(0), S) as j, T.serial(i64(0), i64(D)) as d:
            T.buffer_store(kt, bufs.load(1, b, j, h, d) * f32(config.k_scale), [d, j])
        with T.serial(S, padded) as j, T.serial(i64(0), i64(D)) as d:
            T.buffer_store(kt, f32(0.0), [d, j])
        # the block's rows, ROWS at a time (the last block of a short sequence has fewer)
        with T.serial(i64(0), tirx.floordiv(tirx.min(i64(QUERY_BLOCK), S - first) + ROWS - 1, ROWS)) as tile:
            rows = [T.bind(tirx.min(first + tile * ROWS + r, S - 1)) for r in range(ROWS)]
            q = T.decl_buffer((ROWS, D), "float32", scope="local")
            for r in range(ROWS):
                with T.vectorized(i64(0), i64(D)) as d:
                    T.buffer_store(q, bufs.load(0, b, rows[r], h, d) * f32(config.q_scale), [r, d])
            _scores(scores, q, kt, padded, tiles.key_vectors, lanes, D)
            inverse = T.decl_buffer((ROWS,), "float32", scope="local")
            for r in range(ROWS):
                _softmax_row(bufs, scores, inverse, r, b, h, rows[r], lanes, neg_inf)
            _probabilities_times_values(bufs, scores, inverse, rows, b, h, lanes, pv_vectors)
    return ib.get()


def _scores(scores, q, kt, padded, key_vectors: int, lanes: int, D: int) -> None:
    """scores[r, j] = q[r] · kt[:, j] for the tile's rows, `key_vectors` vectors of keys at a time."""
    key_tile = key_vectors * lanes
    i64 = lambda v: tirx.const(v, "int64")  # noqa: E731
    with T.serial(i64(0), tirx.floordiv(padded, key_tile)) as kb:
        acc = T.decl_buffer((ROWS, key_tile), "float32", scope="local")
        with T.unroll(0, ROWS) as r, T.unroll(0, key_vectors) as kv, T.vectorized(0, lanes) as lane:
            T.buffer_store(acc, tirx.const(0.0, "float32"), [r, kv * lanes + lane])
        loops = (T.serial(i64(0), i64(D)), T.unroll(0, ROWS), T.unroll(0, key_vectors), T.vectorized(0, lanes))
        with loops[0] as d, loops[1] as r, loops[2] as kv, loops[3] as lane:
            at = [r, kv * lanes + lane]
            T.buffer_store(acc, acc[at] + q[r, d] * kt[d, kb * key_tile + kv * lanes + lane], at)
        with T.unroll(0, ROWS) as r, T.unroll(0, key_vectors) as kv, T.vectorized(0, lanes) as lane:
            T.buffer_store(scores, acc[r, kv * lanes + lane], [r, kb * key_tile + kv * lanes + lane])


def _softmax_row(bufs: AttentionBuffers, scores, inverse, r: int, b, h, i, lanes: int, neg_inf) -> None:
    """Row r of the tile: scale and mask, then e = exp(s - max) in place; inverse[r] = 1 / Σ e. A row
    whose every score is -inf has max -inf: with zero_masked_rows it takes max 0 instead (every e is 0)
    and inverse 1, so its output is Σ 0·v as the unfused where(any, softmax, 0)·v gives; without, its
    e are NaN as softmax's are. (max != -inf is "some score is not -inf": a NaN score makes max NaN.)
    With zero_nan_rows a row whose Σ e is NaN gets e = 0 and inverse 1 after the sum."""
    config = bufs.config
    S = bufs.seq
    i64 = lambda v: tirx.const(v, "int64")  # noqa: E731
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    padded = scores.shape[1]
    whole = tirx.floordiv(S, lanes) * lanes

    def masked(j):
        s = scores[r, j] * f32(config.s_scale) if config.s_scale != 1.0 else scores[r, j]
        return s + bufs.mask_at(b, h, i, j) if config.mask_broadcast is not None else s

    # scale, mask and the row's max in one pass: `lanes` partial maxima over the whole vectors, the tail
    # into partial[0] (each value is computed once for its store and its max: no store read back). The
    # vector max is a select that skips NaN (PropagateNaN rewrites only max, and its NaN checks cost 5% of
    # the kernel): a NaN score still makes its row NaN, through its e = exp(NaN - m) in the row's sum.
    partial = T.decl_buffer((lanes,), "float32", scope="local")
    with T.vectorized(0, lanes) as lane:
        T.buffer_store(partial, neg_inf, [lane])
    rewrites = config.s_scale != 1.0 or config.mask_broadcast is not None
    with T.serial(i64(0), tirx.floordiv(S, lanes)) as c, T.vectorized(i64(0), i64(lanes)) as lane:
        if rewrites:
            T.buffer_store(scores, masked(c * lanes + lane), [r, c * lanes + lane])
        value = masked(c * lanes + lane)
        T.buffer_store(partial, tirx.Select(value > partial[lane], value, partial[lane]), [lane])
    with T.serial(whole, S) as j:
        if rewrites:
            T.buffer_store(scores, masked(j), [r, j])
        T.buffer_store(partial, tirx.max(partial[0], masked(j)), [0])
    with T.serial(S, padded) as j:
        T.buffer_store(scores, neg_inf, [r, j])
    # lanes combined one store at a time: a nested max would grow exponentially in PropagateNaN
    for lane in range(1, lanes):
        T.buffer_store(partial, tirx.max(partial[0], partial[lane]), [0])
    keep = partial[0] != neg_inf
    if config.zero_masked_rows:
        T.buffer_store(partial, tirx.Select(keep, partial[0], f32(0.0)), [1])
    else:
        T.buffer_store(partial, partial[0], [1])
    with T.serial(i64(0), tirx.floordiv(padded, lanes)) as c, T.vectorized(i64(0), i64(lanes)) as lane:
        at = [r, c * lanes + lane]
        T.buffer_store(scores, vector_exp(scores[at] - partial[1], nan_select=False, at_most_zero=True), at)
    # (a second loop: TVM 0.27 scalarises a vector loop that reads back the element it stored)
    sums = T.decl_buffer((lanes,), "float32", scope="local")
    with T.vectorized(0, lanes) as lane:
        T.buffer_store(sums, f32(0.0), [lane])
    with T.serial(i64(0), tirx.floordiv(padded, lanes)) as c, T.vectorized(i64(0), i64(lanes)) as lane:
        T.buffer_store(sums, sums[lane] + scores[r, c * lanes + lane], [lane])
    total = sums[0]
    for lane in range(1, lanes):
        total = total + sums[lane]
    inv = f32(1.0) / total
    if config.zero_nan_rows:
        # the sum is NaN exactly where softmax's row is (a NaN or +inf score, or every score -inf): then
        # p = 0. A branch taken by such rows only; `isnan` is scalar here, outside the vector loops.
        nan_row = tirx.isnan(total)
        zero_row = (T.If(nan_row), T.Then(), T.serial(i64(0), tirx.floordiv(padded, lanes)))
        with zero_row[0], zero_row[1], zero_row[2] as c, T.vectorized(i64(0), i64(lanes)) as lane:
            T.buffer_store(scores, f32(0.0), [r, c * lanes + lane])
        T.buffer_store(inverse, tirx.Select(nan_row, f32(1.0), inv), [r])
    else:
        T.buffer_store(inverse, tirx.Select(keep, inv, f32(1.0)) if config.zero_masked_rows else inv, [r])


def _probabilities_times_values(bufs: AttentionBuffers, scores, inverse, rows, b, h, lanes: int, vectors: int) -> None:
    """out[rows[r]] = (scores[r] · v) · inverse[r], ROWS rows x `vectors` vectors of channels a tile."""
    D = bufs.config.head_dim
    S = bufs.seq
    i64 = lambda v: tirx.const(v, "int64")  # noqa: E731
    width = vectors * lanes
    with T.serial(0, D // width) as dt:
        acc = T.decl_buffer((ROWS, width), "float32", scope="local")
        with T.unroll(0, ROWS) as r, T.unroll(0, vectors) as dv, T.vectorized(0, lanes) as lane:
            T.buffer_store(acc, tirx.const(0.0, "float32"), [r, dv * lanes + lane])
        loops = (T.serial(i64(0), S), T.unroll(0, ROWS), T.unroll(0, vectors), T.vectorized(0, lanes))
        with loops[0] as j, loops[1] as r, loops[2] as dv, loops[3] as lane:
            at = [r, dv * lanes + lane]
            d = dt * width + dv * lanes + lane
            T.buffer_store(acc, acc[at] + scores[r, j] * bufs.load(2, b, j, h, d), at)
        for r in range(ROWS):
            with T.unroll(0, vectors) as dv, T.vectorized(0, lanes) as lane:
                d = dt * width + dv * lanes + lane
                T.buffer_store(bufs.out, acc[r, dv * lanes + lane] * inverse[r], [b, rows[r], h, d])
