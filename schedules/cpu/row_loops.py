"""Row-wise normalisations (softmax and its masking epilogue, layer norm, RMS norm) written out as one
pass over each row, whatever the row's length:

    parallel row r (its indices decoded from r):
        m = max over k of x[r, k]          8 vector lanes over the row's whole vectors, then the tail
        out[r, k] = exp(x[r, k] - m)       the intermediate elementwise step, into the output row
        s = sum over k of out[r, k]
        out[r, k] = epilogue(out[r, k], s, mask[r], ...)

Each step is one loop over the row in 8-wide vectors (floor(n / 8) of them, no per-lane predicate)
and a scalar loop over the n % 8 left; reductions keep 8 partial results, combined in order after
the vector loop. Why not the schedule (row_reduction.py): a row of symbolic length (softmax over
seq) can only be split with a predicate on every lane, which TVM's vectoriser turns back into scalar
code, and TVM 0.27 refuses to move the partial-results block of such a split into the row loop; so
that schedule ran four passes over the tensor, the exp and the epilogue scalar (MiniLM's masked
softmax over [1, 12, 128, 128] on 2 Zen 4 cores: 334 us a call there, 120 us here, ~30 cycles per
vector of 8, mostly the exp polynomial and its NaN-keeping clamps). Rows of constant length are
left to that schedule, which vectorises them already (layer norm 128 x 384: 26 us either way).

Taken: after the elementwise steps are inlined, blocks over the same leading axes (the rows: the
last block's axes but its last), each one of: a sum/max/min reduction over the last axis, a per-row
scalar (layer norm's mean), or elementwise over the row (at most one besides the output, kept in the
output row, so of the output's dtype). The last block is elementwise over the row or a reduction
(MiniLM's "some score of the row is not -inf" flag: 34 -> 25 us a call). Their values are the
function's own expressions, with the intermediate buffers read from the row's scalars or the output
row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir import TensorLoad, Var
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.s_tir.stmt import SBlock, SBlockRealize
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T
from tvm.sym.analyzer import Analyzer
from tvm.target import Target

from tensorpress.schedules.cpu.loop_helpers import MIN_PARALLEL_ELEMENTS
from tensorpress.schedules.cpu.vector_exp import with_vector_exp
from tensorpress.schedules.cpu.vector_unit import vector_unit

_COMBINERS = {tirx.Add: lambda a, b: a + b, tirx.Max: tirx.max, tirx.Min: tirx.min}


@dataclass
class _Step:
    """One block of the function: what it computes for one row (or one element of it)."""

    block: SBlock
    kind: str  # "reduce" (over the row), "scalar" (one value a row), "row" (elementwise over the row)
    combine: Callable[[Any, Any], Any] = tirx.max  # a reduction's binary operator
    operand: Any = None  # a reduction's value per element (a PrimExpr)


# At most 8 float32 lanes, AVX-512 targets included: with 16, building MiniLM for x86-64-v4 did not finish
# (minutes inside TVM 0.27's RewriteSimplifier on one store's nest of Select / Max: the NaN-keeping clamps
# of the vector exp); 8 lanes build in seconds, and on Zen 4 a 512-bit op costs two 256-bit ones anyway.
MAX_LANES = 8


class RowLoops(CPUScheduleRule):
    """Row-wise normalisations as explicit row loops (see the module docstring); None for anything
    else, and for rows of a constant length (the schedule in row_reduction.py handles those)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            written = row_loops_func(with_vector_exp(func), min(MAX_LANES, vector_unit(target).lanes("float32")))
        except (s_tir.ScheduleError, ValueError):
            return None
        return None if written is None else s_tir.Schedule(written)


def row_loops_func(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc | None:
    """`func` written as the module docstring's loops, or None when it is not of that form."""
    sch = s_tir.Schedule(func)
    _inline_elementwise(sch)
    root = sch.get_sblock("root") if _has_root(sch) else None
    if root is None:
        return None
    blocks = [sch.get(b) for b in sch.get_child_blocks(root)]
    if _has_predicates(sch.mod["main"]):
        return None  # a block over part of its loops: not a whole row
    out = blocks[-1].writes[0].source
    if not any(p.same_as(out) for p in func.params):
        return None
    *rows, n = [iv.dom.extent for iv in blocks[-1].iter_vars]
    if not rows or isinstance(n, tirx.IntImm):
        return None
    found = [_step(block, rows, n) for block in blocks]
    steps = [s for s in found if s is not None]
    if len(steps) != len(found) or steps[-1].kind == "scalar" or all(s.kind != "reduce" for s in steps):
        return None
    between = [s for s in steps[:-1] if s.kind == "row"]
    if len(between) > 1 or any(s.block.writes[0].source.dtype != out.dtype for s in between):
        return None
    if between and steps[-1].kind != "row":
        return None  # no output row to keep the step in
    return func.with_body(_under_root_block(func, _row_program(steps, out, rows, n, lanes)))


def _under_root_block(func: tirx.PrimFunc, body: tirx.Stmt) -> tirx.Stmt:
    """`body` as the function's root block (its intermediate buffers dropped): Relax's op-pattern
    analysis, which tvm.compile runs again, wants one."""
    root = func.body.block
    block = SBlock(root.iter_vars, [], [], root.name_hint, body, None, [], root.match_buffers, root.annotations)
    return SBlockRealize(func.body.iter_values, func.body.predicate, block)


def _has_predicates(func: tirx.PrimFunc) -> bool:
    realizes: list = []
    tvm_ffi.structural_walk(func.body, [(SBlockRealize, realizes.append)])
    return any(not (isinstance(r.predicate, tirx.IntImm) and int(r.predicate) == 1) for r in realizes)


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
    except s_tir.ScheduleError:
        return False
    return True


def _inline_elementwise(sch: s_tir.Schedule) -> None:
    """Fold every elementwise block whose readers are all elementwise into them (softmax's x - max
    into exp, the divide, the mask's casts and where into the output), or whose one reader is a
    reduction (the casts of "score is not -inf" into the row's any), until none is left to fold. A
    block read by a reduction and another step stays (softmax's exp): inlined, it would be computed
    once per reader."""
    changed = True
    while changed:
        changed = False
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        for block in blocks[:-1]:
            if sch.get(block).init is not None:
                continue
            consumers = sch.get_consumers(block)
            if not consumers or (len(consumers) > 1 and any(sch.get(c).init is not None for c in consumers)):
                continue
            try:
                sch.compute_inline(block)
            except s_tir.ScheduleError:
                continue
            changed = True
            break


def _same(a, b) -> bool:
    return Analyzer().can_prove_equal(a, b)


def _step(block: s_tir.SBlock, rows: list, n) -> _Step | None:
    """What `block` is per row, or None when its axes are not the rows (and the row's elements)."""
    ivs = list(block.iter_vars)
    if len(block.writes) != 1 or not isinstance(block.body, tirx.BufferStore):
        return None
    if len(ivs) < len(rows) or any(iv.iter_type != tirx.IterVar.DataPar for iv in ivs[: len(rows)]):
        return None
    if not all(_same(iv.dom.extent, r) and _same(iv.dom.min, 0) for iv, r in zip(ivs, rows)):
        return None
    store = block.body
    row_vars = [iv.var for iv in ivs[: len(rows)]]
    if len(ivs) == len(rows):
        return _Step(block, "scalar") if _indexed_by(store.indices, row_vars) else None
    if len(ivs) != len(rows) + 1 or not (_same(ivs[-1].dom.extent, n) and _same(ivs[-1].dom.min, 0)):
        return None
    if ivs[-1].iter_type == tirx.IterVar.DataPar:
        return _Step(block, "row") if _indexed_by(store.indices, [*row_vars, ivs[-1].var]) else None
    if ivs[-1].iter_type != tirx.IterVar.CommReduce or block.init is None or not _indexed_by(store.indices, row_vars):
        return None
    value = store.value
    combine = _COMBINERS.get(type(value))
    if combine is None:
        return None
    own = [x for x in (value.a, value.b) if isinstance(x, TensorLoad) and x.source.same_as(store.buffer)]
    if len(own) != 1:
        return None
    operand = value.b if own[0].same_as(value.a) else value.a
    return _Step(block, "reduce", combine, operand)


def _indexed_by(indices, variables) -> bool:
    """Whether `indices` are `variables`, in order, possibly followed by constant zeros (keepdims)."""
    if len(indices) < len(variables):
        return False
    head = all(isinstance(i, tirx.Var) and i.same_as(v) for i, v in zip(indices, variables))
    return head and all(isinstance(i, tirx.IntImm) and int(i) == 0 for i in indices[len(variables) :])


def _row_program(steps: list[_Step], out: tirx.Buffer, rows: list, n, lanes: int) -> tirx.Stmt:
    """The module docstring's loops: every step once a row, in the blocks' order."""
    index_dtype = str(n.ty) if hasattr(n, "ty") else "int64"
    total_rows = rows[0]
    for r in rows[1:]:
        total_rows = total_rows * r
    static_total = _static(total_rows * n)
    intermediates = _BufferMap((s.block.writes[0].source, True) for s in steps[:-1])
    with IRBuilder() as ib:
        loop = T.serial if static_total is not None and static_total < MIN_PARALLEL_ELEMENTS else T.parallel
        with loop(tirx.const(0, index_dtype), total_rows) as r:
            row_index = [T.bind(i) for i in _decode(r, rows)]  # once a row: no divisions in the loops
            scalars = _BufferMap()
            scratch = _BufferMap()
            for step in steps:
                block = step.block
                ivs = [iv.var for iv in block.iter_vars]
                written = block.writes[0].source

                def value_at(expr, k, ivs=ivs):
                    binding = dict(zip(ivs, [*row_index, k] if k is not None else row_index))
                    return _rewrite(expr, binding, scalars, scratch, row_index, k, intermediates)

                if step.kind == "scalar":
                    cell = T.decl_buffer((1,), written.dtype, scope="global")
                    T.buffer_store(cell, value_at(block.body.value, None), [0])
                    scalars[written] = cell
                elif step.kind == "reduce":
                    cell = T.decl_buffer((1,), written.dtype, scope="global")
                    _reduce_row(step, cell, lambda e, k: value_at(e, k), n, lanes, index_dtype)
                    scalars[written] = cell
                    if written.same_as(out):  # the function's result, one value a row
                        T.buffer_store(out, cell[0], [value_at(i, None) for i in block.body.indices])
                else:  # the output row, or the one step between (read back from the output row)
                    _map_row(
                        lambda k: value_at(block.body.value, k),
                        lambda v, k: T.buffer_store(out, v.astype(out.dtype), [*row_index, k]),
                        n,
                        lanes,
                        index_dtype,
                    )
                    scratch[written] = out
    return ib.get()


class _BufferMap:
    """{buffer: value} by identity (buffers are Vars, whose == builds an expression)."""

    def __init__(self, pairs=()):
        self.pairs = list(pairs)

    def __contains__(self, buffer) -> bool:
        return any(b.same_as(buffer) for b, _ in self.pairs)

    def __getitem__(self, buffer):
        return next(v for b, v in self.pairs if b.same_as(buffer))

    def __setitem__(self, buffer, value) -> None:
        self.pairs.append((buffer, value))


def _static(expr) -> int | None:
    simplified = Analyzer().simplify(expr)
    return int(simplified) if isinstance(simplified, tirx.IntImm) else None


def _decode(r, rows: list) -> list:
    """The row indices of the fused row number `r` (the last axis fastest)."""
    indices = []
    for extent in reversed(rows[1:]):
        indices.append(tirx.floormod(r, extent))
        r = tirx.floordiv(r, extent)
    indices.append(r)
    return list(reversed(indices))


def _rewrite(expr, binding, scalars, scratch, row_index, k, intermediates):
    """`expr` of a block, for one row (and element k): its axes bound, an intermediate per-row value
    read from the row's scalar, an intermediate elementwise one from the output row."""
    expr = _substitute(expr, binding)
    problems: list = []

    def load(node: TensorLoad):
        if node.source in scalars:
            return scalars[node.source][0]
        if node.source in scratch:
            if k is None or not _same_indices(node.indices, [*row_index, k]):
                problems.append(node)
                return node
            return scratch[node.source][tuple(node.indices)]
        if node.source in intermediates:
            problems.append(node)
        return node

    rewritten = tvm_ffi.structural_map(expr, (TensorLoad, load))
    if problems:
        raise ValueError("an intermediate read away from the row's element")
    return rewritten


def _substitute(expr, binding: dict):
    """`expr` with each variable of `binding` replaced by its value."""
    pairs = list(binding.items())

    def replace(var: Var):
        return next((value for old, value in pairs if old.same_as(var)), var)

    return tvm_ffi.structural_map(expr, (Var, replace))


def _same_indices(a, b) -> bool:
    return len(a) == len(b) and all(tvm_ffi.structural_equal(x, y) for x, y in zip(a, b))


def _map_row(value_of, store, n, lanes: int, index_dtype: str) -> None:
    """store(value_of(k), k) for every k < n: whole vectors, then the tail."""
    chunks = tirx.floordiv(n, lanes)
    with T.serial(tirx.const(0, index_dtype), chunks) as c, T.vectorized(tirx.const(0, index_dtype), lanes) as lane:
        k = c * lanes + lane
        store(value_of(k), k)
    with T.serial(chunks * lanes, n) as k:
        store(value_of(k), k)


def _reduce_row(step: _Step, cell, value_of, n, lanes: int, index_dtype: str) -> None:
    """cell[0] = the reduction of step.operand over the row: `lanes` partial results over the whole
    vectors, combined in lane order, then the tail."""
    init = step.block.init.value
    combine = step.combine
    partial = T.decl_buffer((lanes,), cell.dtype, scope="global")
    with T.vectorized(0, lanes) as lane:
        T.buffer_store(partial, init, [lane])
    chunks = tirx.floordiv(n, lanes)
    with T.serial(tirx.const(0, index_dtype), chunks) as c, T.vectorized(tirx.const(0, index_dtype), lanes) as lane:
        T.buffer_store(partial, combine(partial[lane], value_of(step.operand, c * lanes + lane)), [lane])
    total = init
    for lane in range(lanes):
        total = combine(total, partial[lane])
    T.buffer_store(cell, total, [0])
    with T.serial(chunks * lanes, n) as k:
        T.buffer_store(cell, combine(cell[0], value_of(step.operand, k)), [0])
