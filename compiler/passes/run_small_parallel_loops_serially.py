"""RunSmallParallelLoopsSerially: a parallel loop nest with little work runs on the calling thread.

Each parallel loop wakes TVM's thread pool, whose workers sleep as soon as they are idle
(runtime/cpu_threads.py: on a busy host a spinning worker takes the CPU other work needs), so a parallel
region costs about 7-10 us of wake-up on the 2-core build machine before any work is done. Most of a
transformer's kernels are small at one sequence (MiniLM at 1x128: a layer norm or transpose over
128 x 384 floats is 5-20 us on one core, and every weight GEMM has a padded copy of X before it), and
their sizes are symbolic, so the schedules cannot tell. This pass, on lowered TIR, gives every outermost
parallel loop a twin that runs the same nest serially, chosen at run time by the work of the nest:

    for i in parallel(E): body          ->  if work < MIN_PARALLEL_WORK:  for i in serial(E): body
                                            else:                          for i in parallel(E): body

work = the elements the nest stores (each store's lanes times the iterations around it). A nest whose
work is a constant keeps only the branch it takes; one whose work depends on a variable defined inside
it (a bound the loop computes) keeps its parallel loop alone.
"""

from __future__ import annotations

import tvm_ffi
from tvm import tirx
from tvm.ir import IRModule
from tvm.runtime import DataType
from tvm.sym.analyzer import Analyzer

# Elements stored below which a nest runs serially. Measured with MiniLM at 1x128 on the 2-core build
# machine (one core / two): a copy of X for a weight GEMM or an attention transpose, 49152 elements,
# ~4 / 17 us; a layer norm, 147456 elements, 17.6 / 26 us; a softmax's exp, 196608 elements, ~1.4 ns
# each, is worth two threads. A nest this small costs at most tens of microseconds on one core.
MIN_PARALLEL_WORK = 65536


def nest_work(stmt) -> tirx.PrimExpr:
    """Elements `stmt` stores, as an int64 expression (a store's lanes times the trip counts around
    it; branches and sequences add up)."""
    if isinstance(stmt, tirx.For):
        return tirx.Cast("int64", stmt.extent) * nest_work(stmt.body)
    if isinstance(stmt, tirx.SeqStmt):
        total = tirx.const(0, "int64")
        for part in stmt.seq:
            total = total + nest_work(part)
        return total
    if isinstance(stmt, tirx.IfThenElse):
        other = nest_work(stmt.else_case) if stmt.else_case is not None else tirx.const(0, "int64")
        return nest_work(stmt.then_case) + other
    if isinstance(stmt, tirx.BufferStore):
        return tirx.const(DataType(str(stmt.value.ty)).lanes, "int64")
    body = getattr(stmt, "body", None)
    if isinstance(body, tirx.Stmt):
        return nest_work(body)
    return tirx.const(0, "int64")


def _serial(loop: tirx.For) -> tirx.For:
    return tirx.For(
        loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body, loop.thread_binding, loop.annotations
    )


def _defined_inside(loop: tirx.For) -> list[tirx.Var]:
    defined: list[tirx.Var] = [loop.loop_var]
    tvm_ffi.structural_walk(
        loop.body,
        [(tirx.For, lambda f: defined.append(f.loop_var)), (tirx.LetStmt, lambda let: defined.append(let.var))],
    )
    return defined


def _with_serial_twin(loop: tirx.For):
    if loop.kind != tirx.ForKind.PARALLEL:
        return loop
    work = Analyzer().simplify(nest_work(loop))
    if isinstance(work, tirx.IntImm):
        return _serial(loop) if work.value < MIN_PARALLEL_WORK else loop
    used: list[tirx.Var] = []
    tvm_ffi.structural_walk(work, [(tirx.Var, used.append)])
    inside = _defined_inside(loop)
    if any(v.same_as(d) for v in used for d in inside):
        return loop
    small = work < tirx.const(MIN_PARALLEL_WORK, "int64")
    return tirx.IfThenElse(small, _serial(loop), loop)


@tirx.transform.prim_func_pass(opt_level=0, name="tensorpress.RunSmallParallelLoopsSerially")
def run_small_parallel_loops_serially(func: tirx.PrimFunc, _mod, _ctx) -> tirx.PrimFunc:
    """Give each parallel loop of `func` its serial twin for small work (module docstring)."""
    changed = tvm_ffi.structural_map(func, (tirx.For, _with_serial_twin))
    if changed.same_as(func):
        return func
    # the twins define the same loop variables and buffers a second time: make each definition unique
    return tirx.transform.ConvertSSA()(IRModule({"main": changed}))["main"]
