"""CPU schedule of the weight GEMM (`schedules/weight_gemm.py`): Y[n, m] = X[n, k] . W[m, k] (+ bias).

Any decode stage works unchanged: its "decode" block runs once per column tile of M, into a [K, cols]
panel that the register-blocked micro-kernel (`register_blocked_gemm`) streams through for every row
tile of N, so the decode cost is paid once per weight element and call, not once per token.
A stage whose stored layout already is such a panel (its `cpu_panel_width`, e.g. dense column panels)
is read in place instead, and costs nothing to decode.

For few tokens (the PrimFunc's tensorpress.n_hint <= 16: decode steps) the decode is the work, and a
stage that reads its rows word by word (its `cpu_decode_order`, e.g. FPx) takes `decode_along_k` instead:
8 codes decoded per vector instruction, straight into 8-wide dot products, no panel.

A stage offering row slots (sparse formats such as ellpack) gets a GEMM over its nonzeros instead,
scheduled by `row_slot_gemm`.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from tensorpress.schedules.cpu.decode_along_k import decodes_along_k, schedule_decode_along_k
from tensorpress.schedules.cpu.register_blocked_gemm import (
    GemmBlocks,
    register_tile,
    schedule_register_blocked_gemm,
)
from tensorpress.schedules.cpu.row_slot_gemm import is_row_slot_gemm, schedule_row_slot_gemm
from tensorpress.schedules.cpu.vector_unit import vector_unit
from tensorpress.schedules.decode_stage import DecodeStage
from tensorpress.schedules.weight_gemm import N_HINT_ATTR, decode_stage_of, is_weight_gemm


class WeightGemm(CPUScheduleRule):
    """The weight-GEMM PrimFunc (attribute tensorpress.kernel = "weight_gemm") on an llvm target."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        if not is_weight_gemm(func):
            return None
        if is_row_slot_gemm(func):  # defined over the nonzeros: no decode block (row_slot_gemm.py)
            return schedule_row_slot_gemm(func)
        try:
            stage = decode_stage_of(func)
        except KeyError:  # made in another process: its decode block is scheduled as it stands
            stage = DecodeStage()
        along_k = _decode_along_k(func, stage)
        if along_k is not None:
            return along_k
        unit = vector_unit(target)
        tile = register_tile(unit, "float32")  # the accumulator is fp32 whatever the activations are
        panel = stage.cpu_panel_width
        sch = s_tir.Schedule(func)
        blocks = GemmBlocks(
            gemm=sch.get_sblock("gemm"),
            b_source=sch.get_sblock("decode"),
            inline_b=panel is not None and panel % tile.cols == 0,
        )
        try:
            schedule_register_blocked_gemm(sch, blocks, tile, unit.lanes("float32"))
        except s_tir.ScheduleError:
            return None  # a decode TVM cannot tile this way: the fallback takes it, slower but right
        return sch


# The decode-along-K kernel: up to this many expected tokens; tiles of (tokens, weight rows) whose
# 8-lane accumulators, decoded rows and X vector fit AVX2's 16 registers (4 x 4 spilled).
_ALONG_K_MAX_TOKENS = 16
_ALONG_K_TILES = {True: (1, 4), False: (4, 2)}  # n_hint == 1 (one token: more rows), else


def _decode_along_k(func: tirx.PrimFunc, stage: DecodeStage) -> s_tir.Schedule | None:
    """The decode-along-K schedule when the stage offers it and few tokens are expected, else None."""
    m, k = (int(v) for v in func.attrs["tensorpress.mk"])
    n_hint = int(func.attrs[N_HINT_ATTR]) if N_HINT_ATTR in func.attrs else _ALONG_K_MAX_TOKENS
    n_tile, m_tile = _ALONG_K_TILES[n_hint == 1]
    if n_hint > _ALONG_K_MAX_TOKENS or m % m_tile or not decodes_along_k(stage, k):
        return None
    try:
        return schedule_decode_along_k(func, stage, n_tile=n_tile, m_tile=m_tile)
    except s_tir.ScheduleError:
        return None
