"""CPU schedule of a channels-last depthwise convolution (MobileNet's 3x3 blocks).

    out[n, y, x, c] = sum_{ry, rx} pad[n, y*s + ry, x*s + rx, c] * w[c, ry, rx, 0]  (+ an epilogue)

Channels are innermost in NHWC, so one vector holds `lanes` channels of one pixel, and a depthwise conv
is KH*KW multiply-adds per vector with no reduction across lanes:

    parallel over output rows (n, y):
      for each group of `width` output pixels along x, each vector of channels:
        acc[width, lanes] = 0                              registers
        for ry, rx:  acc[p, :] += pad[.., x_p*s + rx, c:c+lanes] * w_t[ry, rx, c:c+lanes]
        out[.., c:c+lanes] = epilogue(acc[p, :])           bias, activation, folded in the store

The weight is copied once per call to [KH, KW, C] (w_t) so its channel vectors are contiguous too; a
group of pixels gives `width` independent accumulators, enough to hide the FMA latency. TVM's generic
rules treat this block as a batched matrix product with one column and leave it ~100x slower.
"""

from __future__ import annotations

import contextlib

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.s_tir.dlight.gpu.matmul import get_reduction_blocks
from tvm.target import Target

from tensorpress.schedules.cpu.loop_helpers import static_extent
from tensorpress.schedules.cpu.vector_unit import vector_unit

_PIXELS_PER_TILE = 4  # independent accumulators per channel vector (FMA latency 4 x throughput 2 / 2)


class DepthwiseConv(CPUScheduleRule):
    """One channels-last depthwise conv block (4 spatial axes, KH, KW and a unit channel reduction)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        conv = _depthwise_block(sch)
        if conv is None:
            return None
        lanes = vector_unit(target).lanes(str(sch.get(conv).writes[0].source.dtype))
        if int(sch.get(conv).iter_vars[3].dom.extent) % lanes:
            return None  # channels not whole vectors: the next rule takes it
        try:
            _schedule(sch, conv, lanes)
        except s_tir.ScheduleError:
            return None
        return sch


def _depthwise_block(sch: s_tir.Schedule):
    """The function's depthwise conv block, or None when the function is not one."""
    reductions = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
    if reductions is None:
        return None
    block = sch.get(reductions[0])
    spatial = [iv for iv in block.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    reduce = [iv for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    if len(spatial) != 4 or len(reduce) != 3:
        return None
    if not (_is_static(spatial[3].dom.extent) and _is_static(reduce[2].dom.extent, 1)):
        return None  # static channels, and a unit channel reduction (depthwise)
    channel = spatial[3].var
    write = block.writes[0]
    if len(write.region) != 4 or not write.region[3].min.same_as(channel):
        return None
    reads = [r for r in block.reads if not r.source.same_as(write.source)]
    weights = [r for r in reads if len(r.region) == 4 and r.region[0].min.same_as(channel)]
    inputs = [r for r in reads if len(r.region) == 4 and _mentions(r.region[3].min, channel)]
    if len(weights) != 1 or len(inputs) != 1:
        return None
    return reductions[0]


def _schedule(sch: s_tir.Schedule, conv, lanes: int) -> None:
    for producer in sch.get_producers(conv):  # the zero padding: read in place, the test is per pixel
        with contextlib.suppress(s_tir.ScheduleError):
            sch.compute_inline(producer)
    block = sch.get(conv)
    channel = block.iter_vars[3].var
    weight_index = next((i for i, r in enumerate(block.reads) if r.region[0].min.same_as(channel)), None)
    if weight_index is None:
        raise s_tir.ScheduleError("the padding inline left no per-channel weight read")
    weight_copy = sch.cache_read(conv, weight_index, "global")
    sch.transform_layout(weight_copy, ("write", 0), lambda c, y, x, r: (y, x, r, c))

    n, y, x, c, ry, rx, rc = sch.get_loops(conv)
    width = static_extent(sch, x) or 1
    tile = next(t for t in (_PIXELS_PER_TILE, 3, 2, 1) if width % t == 0)
    x_o, x_i = sch.split(x, [None, tile])
    c_o, c_i = sch.split(c, [None, lanes])
    sch.reorder(n, y, x_o, c_o, ry, rx, rc, x_i, c_i)
    sch.parallel(sch.fuse(n, y))
    registers = sch.cache_write(conv, 0, "local")
    sch.reverse_compute_at(registers, c_o)
    for consumer in sch.get_consumers(registers):  # bias, activation: folded into the store
        with contextlib.suppress(s_tir.ScheduleError):
            sch.reverse_compute_inline(consumer)
    sch.vectorize(sch.get_loops(registers)[-1])
    sch.unroll(x_i)
    sch.vectorize(c_i)
    init = sch.decompose_reduction(conv, ry)
    sch.vectorize(sch.get_loops(init)[-1])


def _is_static(extent, value: int | None = None) -> bool:
    """Whether `extent` is a constant (equal to `value`, when given)."""
    return isinstance(extent, tirx.IntImm) and (value is None or extent.value == value)


def _mentions(expr, var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))
