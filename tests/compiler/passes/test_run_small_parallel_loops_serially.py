"""RunSmallParallelLoopsSerially: a parallel nest storing fewer than MIN_PARALLEL_WORK elements runs
serially (chosen at run time for symbolic sizes), and the kernel computes the same either way."""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import te, tirx
from tvm.ir import IRModule

from tensorpress.compiler.build import tir_pipeline
from tensorpress.compiler.passes.run_small_parallel_loops_serially import (
    MIN_PARALLEL_WORK,
    nest_work,
    run_small_parallel_loops_serially,
)

WIDTH = 64  # elements a row


def _scaled_rows(rows) -> tirx.PrimFunc:
    """B[i, :] = 2 A[i, :] + 1 over `rows` rows (an int or a symbolic var): rows in parallel, 8-wide
    vector stores."""
    from tvm import s_tir

    a = te.placeholder((rows, WIDTH), "float32", name="A")
    b = te.compute((rows, WIDTH), lambda i, j: a[i, j] * 2.0 + 1.0, name="B")
    sch = s_tir.Schedule(te.create_prim_func([a, b]))
    i, j = sch.get_loops(sch.get_sblock("B"))
    _, lanes = sch.split(j, [None, 8])
    sch.parallel(i)
    sch.vectorize(lanes)
    return sch.mod["main"]


def _lowered(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """`func` through TVM's lowering up to (not including) our pass, as the build's pipeline runs it."""
    from tvm.tirx.compilation_pipeline import get_tir_pipeline

    target = tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2"})
    mod = tirx.transform.BindTarget(target.with_host(target))(
        IRModule({"main": func.with_attr("global_symbol", "main")})
    )
    lower, _, _ = get_tir_pipeline("s_tir")
    return lower(mod)["main"]


def _loops(stmt, kind) -> list:
    found: list = []
    tvm_ffi.structural_walk(stmt, [(tirx.For, lambda f: found.append(f) if f.kind == kind else None)])
    return found


def _branches(func: tirx.PrimFunc) -> list:
    found: list = []
    tvm_ffi.structural_walk(func.body, [(tirx.IfThenElse, found.append)])
    return [b for b in found if _loops(b.then_case, tirx.ForKind.SERIAL) and b.else_case is not None]


def test_symbolic_nest_gets_a_serial_twin_for_small_work():
    n = tirx.Var("n", "int64")
    before = _lowered(_scaled_rows(n))
    after = run_small_parallel_loops_serially(IRModule({"main": before}))["main"]
    (branch,) = _branches(after)
    assert _loops(branch.else_case, tirx.ForKind.PARALLEL), "the big case keeps its parallel loop"
    assert not _loops(branch.then_case, tirx.ForKind.PARALLEL), "the small case runs serially"
    # the condition is the work, n rows of WIDTH elements, under the threshold
    for rows in (1, MIN_PARALLEL_WORK // WIDTH - 1, MIN_PARALLEL_WORK // WIDTH, 10**6):
        value = tirx.const(rows, "int64")
        condition = tvm_ffi.structural_map(
            branch.condition, (tirx.Var, lambda v, value=value: value if v.name == "n" else v)
        )
        assert bool(tvm.sym.analyzer.Analyzer().simplify(condition)) == (rows * WIDTH < MIN_PARALLEL_WORK), rows


def test_constant_work_keeps_only_the_branch_it_takes():
    small_rows = MIN_PARALLEL_WORK // WIDTH // 2
    small = run_small_parallel_loops_serially(IRModule({"main": _lowered(_scaled_rows(small_rows))}))["main"]
    assert not _loops(small.body, tirx.ForKind.PARALLEL) and not _branches(small)
    big = _lowered(_scaled_rows(MIN_PARALLEL_WORK // WIDTH * 2))
    assert run_small_parallel_loops_serially(IRModule({"main": big}))["main"].same_as(big)


def test_work_counts_the_lanes_of_each_store():
    func = _lowered(_scaled_rows(10))
    (loop,) = _loops(func.body, tirx.ForKind.PARALLEL)
    assert int(tvm.sym.analyzer.Analyzer().simplify(nest_work(loop))) == 10 * WIDTH


def test_both_branches_compute_the_same():
    n = tirx.Var("n", "int64")
    lib = tvm.compile(
        IRModule({"main": _scaled_rows(n)}),
        target=tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2"}),
        tir_pipeline=tir_pipeline(),
    )
    rng = np.random.default_rng(0)
    for rows in (1, 7, MIN_PARALLEL_WORK // WIDTH - 1, MIN_PARALLEL_WORK // WIDTH, 3 * MIN_PARALLEL_WORK // WIDTH):
        a = rng.standard_normal((rows, WIDTH)).astype(np.float32)
        b = tvm.runtime.empty((rows, WIDTH), "float32", tvm.cpu())
        lib["main"](tvm.runtime.tensor(a, tvm.cpu()), b)
        np.testing.assert_array_equal(b.numpy(), a * 2 + 1, err_msg=f"{rows} rows")
