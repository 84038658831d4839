"""The last CPU rule: any function the others did not take still uses every core.

Blocks are inlined where TVM allows it; each remaining block's leading spatial loops run over the
cores and, when the block is spatial, its innermost loop in vectors. Reductions keep their order.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from tensorpress.schedules.cpu.loop_helpers import (
    inline_where_safe,
    parallelize_outer,
    product_of_static,
    vectorize_innermost,
)
from tensorpress.schedules.cpu.vector_unit import vector_unit


class Fallback(CPUScheduleRule):
    """Any PrimFunc with at least one block; returns the function unchanged in the worst case."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return sch
        for info in inline_where_safe(sch, infos):
            loops = sch.get_loops(info.block_rv)
            kinds = info.dom_kind()
            spatial = len(kinds) - len(kinds.lstrip("S"))
            if spatial == 0 or len(loops) != len(kinds):
                continue
            if info.is_injective():
                dtype = str(sch.get(info.block_rv).writes[0].source.dtype)
                outer = loops[: max(spatial - 1, 1)]
                parallelize_outer(sch, outer, product_of_static(sch, loops[len(outer) :]))
                if spatial > 1:
                    vectorize_innermost(sch, info.block_rv, vector_unit(target).lanes(dtype))
            else:
                parallelize_outer(sch, loops[:spatial], product_of_static(sch, loops[spatial:]))
        return sch
