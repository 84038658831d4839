"""CPU schedule of row-wise normalisations: softmax, layer norm, RMS norm, mean/variance.

These functions chain reductions over the trailing axes of each row with elementwise steps, all
sharing the leading (row) axes, e.g. softmax = max -> exp -> sum -> divide. The rows go over the
cores and every step of one row runs inside that row's iteration, while the row is in L1:

    parallel row:
        sum_rf[0:lanes] = 0;  for chunk: sum_rf[:] += x[row, chunk*lanes : chunk*lanes + lanes]
        sum = sum_rf[0] + ... + sum_rf[lanes - 1]
        ... the other steps, elementwise ones in vectors ...

A reduction over a constant multiple of the vector lanes is split into `lanes` vector partial results
(rfactor), which reorders the float additions the way any vectorised reduction does (torch's
included); the others (a symbolic row length) stay scalar and in order.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from tensorpress.schedules.cpu.loop_helpers import parallelize_outer, static_extent, vectorize_innermost
from tensorpress.schedules.cpu.vector_unit import vector_unit


class RowReduction(CPUScheduleRule):
    """At least one reduction block, the last block elementwise, every block starting with the same
    leading spatial axes (the rows)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or len(infos) < 2 or not infos[-1].is_injective():
            return None
        if all(info.is_injective() for info in infos):
            return None
        rows = min(_leading_spatial(info.dom_kind()) for info in infos)
        if rows == 0:
            return None
        lanes = vector_unit(target).lanes(str(sch.get(infos[-1].block_rv).writes[0].source.dtype))

        # Reductions become (vector partial results, final sum) while each still sits alone at the
        # root: rfactor cannot split a block that shares its loops with others.
        steps = []
        for info in infos[:-1]:
            if not info.is_injective():
                partial = _split_into_vector_partial_results(sch, info.block_rv, lanes)
                if partial is not None:
                    steps.append(partial)
            steps.append(info.block_rv)

        last = infos[-1].block_rv
        parallelize_outer(sch, sch.get_loops(last)[:rows])
        row = sch.get_loops(last)[0]
        for block in reversed(steps):
            sch.compute_at(block, row, preserve_unit_loops=True)
        vectorize_innermost(sch, last, lanes)
        for info in infos[:-1]:
            if info.is_injective():
                vectorize_innermost(sch, info.block_rv, lanes)
        for block in steps:
            if sch.get(block).name_hint.endswith("_rf"):
                _vectorize_lanes(sch, block)
        return sch


def _leading_spatial(dom_kind: str) -> int:
    return len(dom_kind) - len(dom_kind.lstrip("S"))


def _split_into_vector_partial_results(sch: s_tir.Schedule, block, lanes: int):
    """rfactor a reduction over a constant multiple of `lanes` trailing elements into `lanes`
    partial results. Returns the new partial-results block, or None when the reduction stays."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if stmt.iter_vars[-1].iter_type != tirx.IterVar.CommReduce:
        return None
    extent = static_extent(sch, loops[-1])
    if extent is None or extent % lanes or extent == lanes:
        return None
    _, lane = sch.split(loops[-1], [None, lanes])
    try:
        return sch.rfactor(lane, factor_axis=len(stmt.writes[0].source.shape))
    except s_tir.ScheduleError:
        return None


def _vectorize_lanes(sch: s_tir.Schedule, rf_block) -> None:
    """Put the partial-results block's lane axis innermost, vectorise it, and initialise the partial
    results once before the loop over the row's chunks."""
    stmt = sch.get(rf_block)
    lane_var = stmt.writes[0].region[-1].min
    loops = sch.get_loops(rf_block)[-len(stmt.iter_vars) :]
    pairs = list(zip(loops, stmt.iter_vars))
    lane = next(loop for loop, iv in pairs if iv.var.same_as(lane_var))
    chunks = next(loop for loop, iv in pairs if iv.iter_type == tirx.IterVar.CommReduce)
    sch.reorder(chunks, lane)
    sch.vectorize(lane)
    sch.decompose_reduction(rf_block, chunks)
