"""CPU schedule of the weight GEMM over row slots (`weight_gemm.py`, "Row slots"): the nonzeros only.

    acc[n, r] = sum over s of X_t[column(r, s), n] * value(r, s)      rows r in blocks of 8, slot-major

Parallel over the blocks of 8 rows (the threads share nothing). Inside a block, by tokens:

  one token (n_hint == 1): gather          several tokens: X transposed, tokens in lanes
    for each token n:                        X_t[k, t] = X[t, k], tokens padded (the "tokens" block)
      acc[8] = 0                             for each group of T tokens (past N: zeros, sums dropped):
      for each slot s:                         for each half / whole of the block's 8 rows (R rows):
        v = values[b, s, 0:8]  (vcvtph2ps)       acc[R, T] = 0
        c = cols[b, s, 0:8]                      for each slot s:
        acc += v * X[n, c]  (8 loads)              for each of the R rows r:
      Y[n, 8b:8b+8] = acc (+ bias)                   acc[r, :] += value(r, s) * X_t[column(r, s), t:t+T]
                                                 Y[t:t+T, rows] = acc (+ bias), the first N tokens

With one token the 8 lanes are the block's 8 rows: a slot is one vector of values, 8 scalar column
loads and 8 scalar loads of X, no horizontal sum. For 8-row blocks that loop is written out as TIR
(`row_slot_gather.py`: scheduled, the columns become a vector and each X address a vpextrd; 1.59 vs
1.11 ms at 4096 x 4096, 80 %, one thread); other block sizes take the `_gather` schedule below.
(vgatherdps is slower still: 2.09 ms, measured with llvm.x86.avx2.gather.d.ps.256 in the same loop.) With
more tokens a slot's X is T contiguous floats: one broadcast value and T/8 FMAs per nonzero, no
gather; T = 8 for up to 16 expected tokens (decode steps, whose N is often 1), 16 for more (prefill,
encoders), R chosen so the accumulators (R x T/8 vectors) stay in 8 registers. The path is chosen
when the kernel is built (N is symbolic), except that a kernel built for several tokens (8-row blocks)
also holds the written-out one-token loop and takes it when a call has N = 1 (a decode step of one
sequence: 2.4 vs 1.1 ms at 4096 x 4096, 80 %, one thread).
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from tensorpress.schedules.cpu.row_slot_gather import gather_row_slot_func, with_one_token_gather
from tensorpress.schedules.weight_gemm import N_HINT_ATTR, ROW_SLOTS_ATTR, decode_stage_of

LANES = 8  # fp32 lanes of an AVX2 vector
ACCUMULATOR_VECTORS = 8  # of AVX2's 16 registers: the rest hold the value, X and addresses
# The n_hint of a decoder's decode step (`token_count_hint`): N sequences, often 1, so 8 token lanes
# there (at N = 1 they cost about half what 16 do; at N = 16 about 1.2x more).
DECODE_STEP_TOKENS = 16


def is_row_slot_gemm(func: tirx.PrimFunc) -> bool:
    return func.attrs is not None and ROW_SLOTS_ATTR in func.attrs


def default_row_slot_tile(block_rows: int, n_hint: int | None) -> tuple[int, int]:
    """The untuned (token lanes T, rows per pass R) for several tokens: T = 8 up to DECODE_STEP_TOKENS
    expected tokens, else 16; R as many of the block's rows as keep R x T/8 accumulators in 8 registers."""
    tokens = LANES if (n_hint or DECODE_STEP_TOKENS) <= DECODE_STEP_TOKENS else 2 * LANES
    return tokens, max(1, min(block_rows, ACCUMULATOR_VECTORS * LANES // tokens))


def schedule_row_slot_gemm(
    func: tirx.PrimFunc, tokens: int | None = None, rows_per_pass: int | None = None
) -> s_tir.Schedule:
    """The schedule of the module docstring for a weight GEMM defined over row slots: one token
    (n_hint == 1) gathers; more take `tokens` token lanes (a multiple of LANES) and `rows_per_pass`
    rows of a block at a time (dividing its rows), by default `default_row_slot_tile`."""
    block_rows = int(func.attrs[ROW_SLOTS_ATTR])
    n_hint = int(func.attrs[N_HINT_ATTR]) if N_HINT_ATTR in func.attrs else 16
    if n_hint == 1 and block_rows == LANES:
        return s_tir.Schedule(gather_row_slot_func(func, *_gather_arguments(func)))
    if n_hint == 1:  # int32 index math: 8 column indices widen and add in one vector each, not two
        func = tvm.tirx.transform.ForceNarrowIndexToInt32()(tvm.IRModule({"main": func}))["main"]
    sch = s_tir.Schedule(func)
    if n_hint == 1:
        _gather(sch, block_rows)
    else:
        default_tokens, default_rows = default_row_slot_tile(block_rows, n_hint)
        _tokens_in_lanes(sch, block_rows, tokens or default_tokens, rows_per_pass or default_rows)
        if block_rows == LANES and not isinstance(func.params[0].shape[0], tirx.IntImm):
            return s_tir.Schedule(with_one_token_gather(sch.mod["main"], *_gather_arguments(func)))
    return sch


def _gather_arguments(func: tirx.PrimFunc) -> tuple:
    """`row_slot_gather`'s (slots, M) for `func`."""
    m = int(func.attrs["tensorpress.mk"][0])
    return decode_stage_of(func).row_slots, m


def _gather(sch: s_tir.Schedule, block_rows: int) -> None:
    sch.compute_inline(sch.get_sblock("tokens"))  # read X where it is: X_t[c, n] is X[n, c]
    gemm = sch.get_sblock("gemm")
    n, r, s = sch.get_loops(gemm)
    blocks, rows = sch.split(r, [None, block_rows])
    sch.reorder(blocks, n, s, rows)
    sch.parallel(blocks)
    store = sch.get_sblock("store")
    sch.reverse_compute_at(store, n)
    sch.set_scope(gemm, 0, "local")  # acc: one vector register per (block, token)
    sch.vectorize(rows)
    init = sch.decompose_reduction(gemm, s)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(store)[-1])


def _tokens_in_lanes(sch: s_tir.Schedule, block_rows: int, tokens: int, rows_per_pass: int) -> None:
    x_t = sch.get_sblock("tokens")
    sch.parallel(sch.get_loops(x_t)[0])
    gemm = sch.get_sblock("gemm")
    n, r, s = sch.get_loops(gemm)
    blocks, passes, rows = sch.split(r, [None, block_rows // rows_per_pass, rows_per_pass])
    # Tokens past N read the zero padding of X_t and land in the register tile only; the store below
    # keeps the first N (so no predicate splits the vector loop).
    token_groups, lanes = sch.split(n, [None, tokens], disable_predication=True)
    sch.reorder(blocks, passes, token_groups, s, rows, lanes)
    sch.parallel(blocks)
    store = sch.get_sblock("store")
    sch.reverse_compute_at(store, token_groups)
    sch.set_scope(gemm, 0, "local")
    sch.unroll(rows)
    sch.vectorize(lanes)
    init = sch.decompose_reduction(gemm, s)
    sch.vectorize(sch.get_loops(init)[-1])
