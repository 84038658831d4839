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

from tensorpress.schedules.cpu.loop_helpers import (
    parallelize_outer,
    product_of_static,
    static_extent,
    vectorize_innermost,
)
from tensorpress.schedules.cpu.vector_exp import with_vector_exp
from tensorpress.schedules.cpu.vector_unit import vector_unit


class RowReduction(CPUScheduleRule):
    """At least one reduction block, the last block elementwise, every block starting with the same
    leading spatial axes (the rows)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        func = with_vector_exp(func)  # softmax's exp in vectors, not a libm call per element
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or len(infos) < 2 or not infos[-1].is_injective():
            return None
        if all(info.is_injective() for info in infos):
            return None
        if _inline_elementwise_steps(sch, infos):
            infos = normalize_prim_func(sch)
            if infos is None or len(infos) < 2 or not infos[-1].is_injective():
                return None
        rows = _row_loops(sch, infos)
        if not rows:
            return None  # one row (batch 1) or no shared rows: nothing to spread, the fallback takes it
        lanes = vector_unit(target).lanes(str(sch.get(infos[-1].block_rv).writes[0].source.dtype))
        if any(_symbolic_reduction(sch, info) for info in infos):
            staged = _try_staged(func, lanes)
            if staged is not None:
                return staged
        try:
            return _schedule_rows(sch, infos, rows, lanes)
        except s_tir.ScheduleError:
            return None  # e.g. a reduction that is also an output of the function: cannot move into a row


def _inline_elementwise_steps(sch: s_tir.Schedule, infos) -> bool:
    """Fold every elementwise step whose consumers are all elementwise into them (softmax's
    x - max into exp, its divide, mask and broadcast into the output), so that no whole-tensor
    intermediate is written and read again. A step a reduction reads (exp, read by the sum) stays:
    inlining it would compute it once per reader. Returns whether anything was inlined."""
    changed = False
    for info in infos[:-1]:
        block = info.block_rv
        if not info.is_injective():
            continue
        consumers = sch.get_consumers(block)
        if not consumers or any(sch.get(c).init is not None for c in consumers):
            continue
        try:
            sch.compute_inline(block)
        except s_tir.ScheduleError:
            continue
        changed = True
    return changed


def _symbolic_reduction(sch: s_tir.Schedule, info) -> bool:
    """A reduction whose innermost (reduced) loop has a symbolic extent, e.g. softmax over seq."""
    if info.is_injective():
        return False
    loops = sch.get_loops(info.block_rv)
    return bool(loops) and static_extent(sch, loops[-1]) is None


def _try_staged(func: tirx.PrimFunc, lanes: int) -> s_tir.Schedule | None:
    """Rows of symbolic length, in stages over the rows: each reduction over a symbolic row becomes
    `lanes` vector partial results (the chunk past the row's end masked by the split's predicate)
    in a parallel pass of its own, and each other step a parallel pass whose final combines of
    partial results are computed inside it. TVM 0.27's compute_at drops the predicate of a partial-
    results block, so those stay at the root, unlike the one-pass schedule of _schedule_rows (a
    scalar reduction there runs a chain of dependent adds as long as the row). None where TVM
    refuses a step."""
    sch = s_tir.Schedule(func)
    try:
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        _inline_elementwise_steps(sch, infos)
        infos = normalize_prim_func(sch)
        if infos is None or len(infos) < 2:
            return None
        combines, elementwise = [], []
        for info in infos:
            if info.is_injective():
                elementwise.append(info.block_rv)
                continue
            *rows, row = sch.get_loops(info.block_rv)
            if static_extent(sch, row) is not None:
                return None  # a fixed-length reduction beside a symbolic one: the one-pass schedule
            _, lane = sch.split(row, [None, lanes])
            partial = sch.rfactor(lane, factor_axis=len(sch.get(info.block_rv).writes[0].source.shape))
            *rows, chunks, lane = sch.get_loops(partial)
            sch.vectorize(lane)
            # Rows over the cores, fused only as far as the fused index divides by constants (a
            # reduction's bindings must stay affine), before the init is split off (after it TVM
            # refuses `parallel`).
            prefix = _affine_prefix(sch, rows)
            if product_of_static(sch, prefix) < 2:
                return None
            parallelize_outer(sch, prefix)
            sch.decompose_reduction(partial, sch.get_loops(partial)[-2])
            combines.append(info.block_rv)
        for block in elementwise:
            loops = sch.get_loops(block)
            parallelize_outer(sch, loops[:-1])
            vectorize_innermost(sch, block, lanes)
        for block in combines:  # into the row loop of the step that reads the combined value
            consumers = sch.get_consumers(block)
            if len(consumers) == 1 and sch.get(consumers[0]).init is None:
                sch.compute_at(block, sch.get_loops(consumers[0])[0], preserve_unit_loops=True)
            else:
                parallelize_outer(sch, _affine_prefix(sch, sch.get_loops(block)[:-1]))
    except s_tir.ScheduleError:
        return None
    return sch


def _affine_prefix(sch: s_tir.Schedule, loops: list) -> list:
    """The leading loops whose fusion divides only by constants: the first, then each next one while
    its extent is constant ([b, 12, s] gives [b, 12])."""
    prefix = loops[:1]
    for loop in loops[1:]:
        if static_extent(sch, loop) is None:
            break
        prefix.append(loop)
    return prefix


def _schedule_rows(sch: s_tir.Schedule, infos, rows: int, lanes: int) -> s_tir.Schedule:
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
    beyond_rows = len(sch.get_loops(last)) - rows
    parallelize_outer(sch, sch.get_loops(last)[:rows])
    row_loops = sch.get_loops(last)[: len(sch.get_loops(last)) - beyond_rows]
    row = row_loops[0]
    for block in reversed(steps):
        sch.compute_at(block, row, preserve_unit_loops=True)
    # Only loops inside the row are vectorised: a block with no axis beyond the rows (a GEMV's
    # epilogue, one value per row) would vectorise the row loop that holds the reductions.
    shared = {sch.get_sref(loop) for loop in row_loops}
    for block in [last, *(info.block_rv for info in infos[:-1] if info.is_injective())]:
        if sch.get_sref(sch.get_loops(block)[-1]) not in shared:
            vectorize_innermost(sch, block, lanes)
    for block in steps:
        if sch.get(block).name_hint.endswith("_rf"):
            _vectorize_lanes(sch, block)
    return sch


def _leading_spatial(dom_kind: str) -> int:
    return len(dom_kind) - len(dom_kind.lstrip("S"))


def _row_loops(sch: s_tir.Schedule, infos) -> int:
    """How many leading loops of the last block walk the rows that every reduction shares.

    normalize_prim_func drops unit axes from elementwise blocks but not always from reductions: a
    softmax over [1, N] has a last block over (N) and a max over (1, N). So the rows are matched by
    their element count, not by the position of the axes: the reductions' rows (the product of their
    leading spatial extents) must be the product of the first loops of the last block. 0 when they do
    not line up, or when there is a single row (nothing to spread over the cores)."""
    kinds = [info.dom_kind() for info in infos]
    rows = min(_leading_spatial(kind) for kind in kinds)
    if rows == 0:
        return 0
    last_extents = [static_extent(sch, loop) for loop in sch.get_loops(infos[-1].block_rv)[:rows]]
    reduction_rows = [
        [iv.dom.extent for iv in sch.get(info.block_rv).iter_vars][: _leading_spatial(kind)]
        for info, kind in zip(infos, kinds)
        if not info.is_injective()
    ]
    if None in last_extents or not all(isinstance(e, tirx.IntImm) for r in reduction_rows for e in r):
        return rows  # symbolic rows: only constant unit axes are ever dropped, the axes line up
    counts = {_product(int(e) for e in r) for r in reduction_rows}
    if len(counts) != 1 or counts == {1}:
        return 0
    (count,) = counts
    for n in range(1, rows + 1):
        if _product(last_extents[:n]) == count:  # type: ignore[arg-type]
            return n
    return 0


def _product(values) -> int:
    total = 1
    for v in values:
        total *= v
    return total


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
