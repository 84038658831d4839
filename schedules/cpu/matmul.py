"""CPU schedule of the matmuls Relax legalization produces: plain, batched (attention's Q.K^T and P.V)
and with a fused elementwise epilogue (bias, scale, cast).

Any block of the form C[S, I, J] += A[S, I, K] * B[S, J, K] (in any index order and layout; S are the
batch axes shared by all three) is first brought into that canonical order, as dlight's GPU rule does,
and then gets the register-blocked micro-kernel of `register_blocked_gemm`: columns J in vectors, rows
I padded to the register tile (so a symbolic sequence length costs no bounds checks), B packed once
per column tile.
"""

from __future__ import annotations

import contextlib

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.s_tir.dlight.gpu.matmul import get_index_map, get_reduction_blocks
from tvm.target import Target

from tensorpress.schedules.cpu.register_blocked_gemm import (
    GemmBlocks,
    register_tile,
    schedule_register_blocked_gemm,
)
from tensorpress.schedules.cpu.vector_unit import vector_unit


class Matmul(CPUScheduleRule):
    """One reduction block that is a (batched) matrix product, plus elementwise blocks around it."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        reductions = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
        if reductions is None:
            return None
        main = reductions[0]
        if get_index_map(sch.get(main)) is None or _is_matrix_vector(sch.get(main)):
            return None

        # C[S, I, J] += A[S, I, K] * B[S, J, K]: reindex copies put each operand in that order.
        reindex_a = sch.reindex(main, ("read", 0))
        reindex_b = sch.reindex(main, ("read", 1))
        reindex_c = sch.reindex(main, ("write", 0))
        matmul_map, a_map, b_map, c_map = get_index_map(sch.get(main))
        sch.transform_layout(reindex_a, ("write", 0), a_map)
        sch.transform_layout(reindex_b, ("write", 0), b_map)
        sch.transform_layout(reindex_c, ("read", 0), c_map)
        sch.transform_block_layout(main, matmul_map)
        _inline_producers(sch, reindex_b)

        unit = vector_unit(target)
        dtype = sch.get(main).writes[0].source.dtype
        tile = register_tile(unit, dtype)
        blocks = GemmBlocks(main, a_source=reindex_a, b_source=reindex_b)
        try:
            schedule_register_blocked_gemm(sch, blocks, tile, unit.lanes(dtype))
        except s_tir.ScheduleError:
            return None  # a layout TVM cannot tile this way: the next rule takes it, slower but right
        return sch


def _is_matrix_vector(block) -> bool:
    """A GEMV (one row or one column, statically): left to dlight's GEMV rule."""
    extents = [iv.dom.extent for iv in block.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    return any(isinstance(e, tirx.IntImm) and e.value == 1 for e in extents[-2:])


def _inline_producers(sch: s_tir.Schedule, block) -> None:
    """Fold elementwise producers (a transpose, a cast) into the B copy, which is packed per tile."""
    for producer in sch.get_producers(block):
        with contextlib.suppress(s_tir.ScheduleError):
            sch.compute_inline(producer)
