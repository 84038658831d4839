"""The CPU fallback: functions no other rule takes still run right, over the cores."""

import numpy as np
from cpu_schedule_harness import compiled, only_prim_func, relax_graph, rng, schedule, sym
from tvm import relax, te, tirx

from tensorpress.schedules.cpu.fallback import Fallback


def test_column_sums_run_in_parallel():
    rows, cols = tirx.IntImm("int64", 300), tirx.IntImm("int64", 64)
    x = te.placeholder((rows, cols), "float32", name="x")
    k = te.reduce_axis((0, rows), name="k")
    y = te.compute((cols,), lambda j: te.sum(x[k, j], axis=k), name="y")
    sch = schedule(Fallback(), te.create_prim_func([x, y]))
    assert "T.parallel" in sch.mod["main"].script()
    data = rng(0).standard_normal((300, 64)).astype("float32")
    (out,) = compiled(sch)([data], [((64,), "float32")])
    np.testing.assert_allclose(out, data.astype(np.float64).sum(0), rtol=1e-4, atol=1e-4)


def test_argmax_with_symbolic_rows():
    n = sym("n")
    mod = relax_graph([("x", [n, 50], "float32")], lambda bb, x: bb.emit(relax.op.argmax(x, axis=1)))
    call = compiled(schedule(Fallback(), only_prim_func(mod)))
    data = rng(1).standard_normal((7, 50)).astype("float32")
    (out,) = call([data], [((7,), "int64")])
    np.testing.assert_array_equal(out, data.argmax(1))


def test_elementwise_functions_are_vectorised_too():
    b = sym("b")
    mod = relax_graph([("x", [b, 4096], "float32")], lambda bb, x: bb.emit(relax.op.exp(x)))
    sch = schedule(Fallback(), only_prim_func(mod))
    assert "T.parallel" in sch.mod["main"].script()
    data = rng(2).standard_normal((3, 4096)).astype("float32")
    (out,) = compiled(sch)([data], [((3, 4096), "float32")])
    np.testing.assert_allclose(out, np.exp(data), rtol=1e-6)
