"""CPU weight GEMM for few tokens: decode W along K, 8 codes at a time, straight into the dot products.

With a handful of tokens (decode steps) the weight GEMM is a few matrix-vector products and the
decode of W is the work. The panel schedule (`register_blocked_gemm`) decodes along the columns of a
panel, one scalar code at a time. A stage that can read its rows word by word says so with
its `cpu_decode_order`: position(col), a permutation of each group of `group` columns (its own
inverse) under which every run of `run` (8) consecutive positions comes from one stored
word per plane (FPx: `fpx_layout.decode_position`). Then:

    X_pad[n, p]   = X[n, col(p)]                 once per call: X in the stage's order (N x K, small)
    parallel over tiles of m_tile weight rows:
      for each n_tile tokens:
        acc[n_tile, m_tile, 8] = 0               vector registers
        for each run r of 8 positions (K / 8):
          w[m, 0:8]  = decode(row m, run r)      one broadcast word + one per-lane shift per plane,
                                                 the fp16 patterns converted to fp32 (vcvtph2ps)
          acc[n, m, :] += X_pad[n, 8r:8r+8] * w[m, :]     8-wide FMA, every token of the tile
      Y[n, m] = store(sum of acc[n, m, :])       epilogue: row scale, bias, cast

The sum over k runs in the stage's order with 8 partial sums per output: the same products as the
panel schedule, added in another order (fp32 rounding differs, not the math).
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from tensorpress.schedules.decode_stage import DecodeStage

DECODE_LANES = 8


def decodes_along_k(stage: DecodeStage, k: int) -> bool:
    """Whether `stage` offers a word-by-word order and K is made of whole groups of it."""
    order = stage.cpu_decode_order
    return order is not None and order.run == DECODE_LANES and k % order.group == 0


def schedule_decode_along_k(func: tirx.PrimFunc, stage: DecodeStage, n_tile: int, m_tile: int) -> s_tir.Schedule:
    """The schedule of the module docstring for a weight-GEMM PrimFunc of `stage` (see
    `decodes_along_k`); tokens are padded to whole n_tiles inside the kernel, M must divide by m_tile."""
    assert stage.cpu_decode_order is not None
    position = stage.cpu_decode_order.position
    # int32 index math: the permutation's index maps need one index type per buffer (N is int64).
    func = tvm.tirx.transform.ForceNarrowIndexToInt32()(tvm.IRModule({"main": func}))["main"]
    sch = s_tir.Schedule(func)
    sch.pad_einsum(sch.get_sblock("gemm"), [n_tile, 1, 1])
    blocks = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    if "gemm_pad" in blocks:
        sch.compute_inline(sch.get_sblock("gemm_pad"))  # the un-pad copy; "store" reads the padded sums
    gemm, decode = sch.get_sblock("gemm"), sch.get_sblock("decode")

    # Walk K in the stage's order: the GEMM's k, the decoded W and a copy of X all permuted alike.
    sch.transform_block_layout(gemm, lambda n, m, k: (n, m, position(k)))
    sch.transform_layout(decode, ("write", 0), lambda m, k: (m, position(k)))
    sch.transform_block_layout(decode, lambda m, k: (m, position(k)))
    x_copy = sch.get_sblock("X_pad") if "X_pad" in blocks else sch.cache_read(gemm, 0, "global")
    sch.transform_layout(x_copy, ("write", 0), lambda n, k: (n, position(k)))

    n, m, k = sch.get_loops(gemm)
    m_o, m_i = sch.split(m, [None, m_tile])
    n_o, n_i = sch.split(n, [None, n_tile])
    k_o, k_i = sch.split(k, [None, DECODE_LANES])
    sch.reorder(m_o, n_o, k_o, n_i, m_i, k_i)
    partial = sch.rfactor(k_i, 2)  # acc[n, m, lane]: 8 partial sums per output
    m_o, n_o, k_o, n_i, m_i, k_i = sch.get_loops(partial)
    sch.parallel(m_o)
    registers = sch.cache_write(partial, 0, "local")
    sch.reverse_compute_at(registers, n_o)
    sch.compute_at(decode, k_o)
    sch.set_scope(decode, 0, "local")  # the decoded run lives in registers: no store, no reload
    *_, decode_rows, decode_lanes = sch.get_loops(decode)
    sch.vectorize(decode_lanes)
    sch.unroll(decode_rows)
    sch.vectorize(k_i)
    sch.unroll(m_i)
    sch.unroll(n_i)
    init = sch.decompose_reduction(partial, k_o)
    sch.vectorize(sch.get_loops(init)[-1])
    # the sums of the 8 lanes and the epilogue, per row tile (in the same parallel task)
    sch.reverse_compute_at(sch.get_sblock("gemm"), m_o)
    sch.reverse_compute_at(sch.get_sblock("store"), m_o)
    return sch
