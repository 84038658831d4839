"""Loop-level steps the CPU rules share: vectorise an innermost loop, spread outer loops over cores."""

from __future__ import annotations

import tvm_ffi
from tvm import ir, s_tir, tirx
from tvm.s_tir.schedule import LoopRV, SBlockRV

# Below this many elements, waking the thread pool (a few microseconds) costs more than it saves.
MIN_PARALLEL_ELEMENTS = 4096


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of n that is at most `at_most` (1 at least): a tile that splits n evenly."""
    return max(k for k in range(1, max(1, at_most) + 1) if n % k == 0)


def static_extent(sch: s_tir.Schedule, loop: LoopRV) -> int | None:
    """The loop's extent when it is a constant, else None (a symbolic dimension)."""
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def vectorize_innermost(sch: s_tir.Schedule, block: SBlockRV, lanes: int) -> None:
    """Vectorise the block's innermost loop: whole when it is at most a few vectors long, else split
    into vectors (a ragged constant extent gets a tail predicate). Symbolic extents and lane-dependent
    bounds checks are left as plain loops for LLVM's loop vectoriser."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    extent = static_extent(sch, inner)
    if extent is None or extent == 1 or _lanes_are_conditional(sch, block, inner):
        # Left to LLVM's loop vectoriser: a symbolic extent (LLVM adds the scalar tail loop itself;
        # a TVM split would put a bounds check on every lane), or a bounds check that depends on the
        # lane (padding), which TVM's vectoriser would turn back into a scalar loop anyway.
        return
    if extent <= lanes or (extent % lanes == 0 and extent <= 4 * lanes):
        sch.vectorize(inner)
        return
    _, vec = sch.split(inner, [None, lanes])
    sch.vectorize(vec)


def parallelize_outer(sch: s_tir.Schedule, loops: list[LoopRV], work_per_iteration: int = 1) -> None:
    """Fuse `loops` (outermost first) and run them over the cores, unless the whole nest is statically
    too small to be worth waking the threads."""
    if not loops:
        return
    extents = [static_extent(sch, loop) for loop in loops]
    if all(e is not None for e in extents):
        total = work_per_iteration
        for e in extents:
            total *= e  # type: ignore[operator]
        if total < MIN_PARALLEL_ELEMENTS or all(e == 1 for e in extents):
            return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    sch.parallel(fused)


def inline_where_safe(sch: s_tir.Schedule, infos: list) -> list:
    """dlight's `try_inline`, except that nothing is folded into a reduction block: when a reduction's
    axes all have extent 1 (a matmul with K = 1) dlight sees it as spatial, and TVM 0.27's
    reverse_compute_inline then puts the consumer into both the reduction's init and its update (a bias
    is added twice). Returns the blocks left."""
    infos = list(infos)

    def first(inline, allowed) -> int | None:
        for i, info in enumerate(infos):
            if not allowed(info.block_rv):
                continue
            try:
                inline(info.block_rv)
            except Exception:  # noqa: BLE001 - TVM refuses this one: try the next block
                continue
            return i
        return None

    def not_after_reduction(block: SBlockRV) -> bool:
        return all(sch.get(p).init is None for p in sch.get_producers(block))

    while True:
        i = first(sch.compute_inline, lambda block: sch.get(block).init is None)
        if i is None:
            i = first(sch.reverse_compute_inline, not_after_reduction)
        if i is None:
            return infos
        infos.pop(i)


def product_of_static(sch: s_tir.Schedule, loops: list[LoopRV]) -> int:
    """Product of the constant extents among `loops` (symbolic ones count as 1)."""
    total = 1
    for loop in loops:
        total *= static_extent(sch, loop) or 1
    return total


def _lanes_are_conditional(sch: s_tir.Schedule, block: SBlockRV, loop: LoopRV) -> bool:
    """Whether the block's predicate or an if_then_else in its body depends on `loop`'s variable."""
    loop_stmt = sch.get(loop)
    target = sch.get(block)
    realizes: list = []
    tvm_ffi.structural_walk(
        loop_stmt, [(s_tir.SBlockRealize, lambda r: realizes.append(r) if r.block.same_as(target) else None)]
    )
    if not realizes:
        return False
    realize = realizes[0]
    if uses(realize.predicate, loop_stmt.loop_var):
        return True
    lane_vars = [iv.var for iv, value in zip(target.iter_vars, realize.iter_values) if uses(value, loop_stmt.loop_var)]
    conditions: list = []

    def collect(call):
        if isinstance(call.op, ir.Op) and call.op.name.endswith("if_then_else"):
            conditions.append(call.args[0])

    tvm_ffi.structural_walk(target.body, [(ir.Call, collect)])
    return any(uses(cond, var) for cond in conditions for var in lane_vars)


def uses(expr, var) -> bool:
    """Whether `var` occurs in `expr`."""
    hits: list = []
    tvm_ffi.structural_walk(expr, [(tirx.Var, lambda v: hits.append(v) if v.same_as(var) else None)])
    return bool(hits)
