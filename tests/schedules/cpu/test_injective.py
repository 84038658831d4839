"""The CPU injective schedule against numpy: elementwise, broadcast, transpose, gather, flat loops."""

import math

import numpy as np
from cpu_schedule_harness import AVX2, compiled, only_prim_func, relax_graph, rng, schedule, sym
from tvm import relax, te

from tensorpress.schedules.cpu.injective import Injective


def _loop_kinds(sch) -> set[str]:
    """Which of parallel / vectorized loops the scheduled function has."""
    script = sch.mod["main"].script()
    return {kind for kind in ("parallel", "vectorized") if f"T.{kind}" in script}


def test_gelu_with_symbolic_rows_is_parallel_and_vectorised():
    b, s = sym("b"), sym("s")
    mod = relax_graph([("x", [b, s, 64], "float32")], lambda bb, x: bb.emit(relax.op.nn.gelu(x)))
    sch = schedule(Injective(), only_prim_func(mod))
    assert _loop_kinds(sch) == {"parallel", "vectorized"}
    call = compiled(sch)
    x = rng(0).standard_normal((2, 33, 64)).astype("float32")
    (y,) = call([x], [(x.shape, "float32")])
    erf = np.vectorize(math.erf)
    np.testing.assert_allclose(y, 0.5 * x * (1 + erf(x / math.sqrt(2))), rtol=1e-5, atol=1e-6)


def test_scale_and_broadcast_mask_with_symbolic_last_axis():
    # The attention mask add: [b, 12, s, s] * c + [b, 1, s, s], the last axis symbolic.
    b, s = sym("b"), sym("s")
    mod = relax_graph(
        [("x", [b, 12, s, s], "float32"), ("mask", [b, 1, s, s], "float32")],
        lambda bb, x, m: bb.emit(relax.op.add(bb.emit(relax.op.multiply(x, relax.const(0.125))), m)),
    )
    call = compiled(schedule(Injective(), only_prim_func(mod)))
    g = rng(1)
    for batch, length in ((1, 1), (2, 7), (1, 33)):
        x = g.standard_normal((batch, 12, length, length)).astype("float32")
        m = g.standard_normal((batch, 1, length, length)).astype("float32")
        (y,) = call([x, m], [(x.shape, "float32")])
        np.testing.assert_allclose(y, x * 0.125 + m, rtol=1e-6)


def test_head_transpose():
    b, s = sym("b"), sym("s")
    mod = relax_graph(
        [("x", [b, s, 12, 32], "float32")],
        lambda bb, x: bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1])),
    )
    call = compiled(schedule(Injective(), only_prim_func(mod)))
    x = rng(2).standard_normal((2, 5, 12, 32)).astype("float32")
    (y,) = call([x], [((2, 12, 32, 5), "float32")])
    np.testing.assert_array_equal(y, x.transpose(0, 2, 3, 1))


def test_embedding_gather():
    n = sym("n")
    mod = relax_graph(
        [("table", [100, 48], "float32"), ("ids", [n], "int32")],
        lambda bb, t, i: bb.emit(relax.op.take(t, i, axis=0)),
    )
    call = compiled(schedule(Injective(), only_prim_func(mod)))
    table = rng(3).standard_normal((100, 48)).astype("float32")
    ids = np.array([5, 0, 99, 5, 17], dtype="int32")
    (y,) = call([table, ids], [((5, 48), "float32")])
    np.testing.assert_array_equal(y, table[ids])


def test_flat_loop_and_bool_output():
    n = sym("n")
    mod = relax_graph([("x", [n], "int64")], lambda bb, x: bb.emit(relax.op.astype(x, "bool")))
    call = compiled(schedule(Injective(), only_prim_func(mod)))
    for length in (1, 3, 1000):
        x = rng(4).integers(0, 2, size=length).astype("int64")
        (y,) = call([x], [((length,), "bool")])
        np.testing.assert_array_equal(y, x.astype(bool))


def test_small_static_work_stays_on_one_core():
    x = te.placeholder((4, 8), "float32", name="x")
    y = te.compute((4, 8), lambda i, j: x[i, j] + 1.0, name="y")
    sch = schedule(Injective(), te.create_prim_func([x, y]))
    assert "T.parallel" not in sch.mod["main"].script()
    (out,) = compiled(sch)([np.ones((4, 8), "float32")], [((4, 8), "float32")])
    np.testing.assert_array_equal(out, np.full((4, 8), 2.0, "float32"))


def test_declines_reductions():
    x = te.placeholder((8, 8), "float32", name="x")
    k = te.reduce_axis((0, 8), name="k")
    y = te.compute((8,), lambda i: te.sum(x[i, k], axis=k), name="y")
    assert Injective().apply(te.create_prim_func([x, y]), AVX2, False) is None


def test_silu_exp_runs_in_vectors_and_keeps_the_edges():
    # SiLU's sigmoid exp is `vector_exp`'s arithmetic: overflow to inf gives x * 0 = -0 / 0, not NaN
    b = sym("b")
    mod = relax_graph([("x", [b, 64], "float32")], lambda bb, x: bb.emit(relax.op.nn.silu(x)))
    sch = schedule(Injective(), only_prim_func(mod))
    assert "T.exp(" not in sch.mod["main"].script()
    x = rng(3).standard_normal((3, 64)).astype("float32") * 40
    x[0, :6] = [-np.inf, np.inf, np.nan, -100.0, 100.0, 0.0]
    (y,) = compiled(sch)([x], [(x.shape, "float32")])
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float64) / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-7, equal_nan=True)
