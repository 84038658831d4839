"""CPU schedule of injective functions: elementwise maths, broadcasts, transposes, reshapes, gathers.

Every block is inlined into the one that writes the output where TVM allows it; each remaining block
runs its outer loops over the cores and its innermost loop in vectors. Symbolic shapes are fine: a
symbolic innermost loop is split into vectors with a tail predicate.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from tensorpress.schedules.cpu.loop_helpers import (
    inline_where_safe,
    parallelize_outer,
    static_extent,
    vectorize_innermost,
)
from tensorpress.schedules.cpu.vector_exp import with_vector_exp
from tensorpress.schedules.cpu.vector_unit import vector_unit


class Injective(CPUScheduleRule):
    """Functions whose blocks are all spatial (no reduction axis)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(with_vector_exp(func))  # sigmoid's, SiLU's exp in vectors, not a libm call each
        infos = normalize_prim_func(sch)
        if infos is None or not infos or not all(info.is_injective() for info in infos):
            return None
        remaining = inline_where_safe(sch, infos)
        for info in remaining:
            block = info.block_rv
            dtype = sch.get(block).writes[0].source.dtype
            lanes = vector_unit(target).lanes(str(dtype))
            loops = sch.get_loops(block)
            if not loops:
                continue
            if len(loops) == 1:  # a flat loop: its outer part goes to the cores, the rest in vectors
                outer, _ = sch.split(loops[0], [None, 4 * lanes])
                parallelize_outer(sch, [outer], work_per_iteration=4 * lanes)
            else:
                inner_extent = static_extent(sch, loops[-1]) or lanes
                parallelize_outer(sch, loops[:-1], work_per_iteration=inner_extent)
            vectorize_innermost(sch, block, lanes)
        return sch
