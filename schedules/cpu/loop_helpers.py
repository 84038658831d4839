"""Loop-level steps the CPU rules share: vectorise an innermost loop, spread outer loops over cores."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.schedule import LoopRV, SBlockRV

# Below this many elements, waking the thread pool (a few microseconds) costs more than it saves.
MIN_PARALLEL_ELEMENTS = 4096


def static_extent(sch: s_tir.Schedule, loop: LoopRV) -> int | None:
    """The loop's extent when it is a constant, else None (a symbolic dimension)."""
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def vectorize_innermost(sch: s_tir.Schedule, block: SBlockRV, lanes: int) -> None:
    """Vectorise the block's innermost loop: whole when it is at most a few vectors long, else split
    into vectors (a symbolic or ragged extent gets a tail predicate)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    extent = static_extent(sch, inner)
    if extent is None or extent == 1:
        # A symbolic extent is left to LLVM's loop vectoriser, which adds the scalar tail loop
        # itself; a TVM split would put a bounds check on every lane and scalarise the loop.
        return
    if extent is not None and (extent <= lanes or (extent % lanes == 0 and extent <= 4 * lanes)):
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


def product_of_static(sch: s_tir.Schedule, loops: list[LoopRV]) -> int:
    """Product of the constant extents among `loops` (symbolic ones count as 1)."""
    total = 1
    for loop in loops:
        total *= static_extent(sch, loop) or 1
    return total
