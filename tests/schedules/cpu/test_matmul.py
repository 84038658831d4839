"""The CPU matmul schedule against numpy, on functions as Relax legalisation produces them."""

import numpy as np
import pytest
from cpu_schedule_harness import AVX2, compiled, only_prim_func, relax_graph, rng, schedule, sym
from tvm import relax, te, tirx

from tensorpress.schedules.cpu.matmul import Matmul


def _close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m", [48, 40, 20])
def test_linear_with_bias_symbolic_rows(m):
    k, n = 40, sym("n")
    mod = relax_graph(
        [("x", [n, k], "float32"), ("w", [k, m], "float32"), ("b", [m], "float32")],
        lambda bb, x, w, b: bb.emit(relax.op.add(bb.emit(relax.op.matmul(x, w)), b)),
    )
    call = compiled(schedule(Matmul(), only_prim_func(mod, "matmul")))
    g = rng(m)
    w, b = g.standard_normal((k, m)).astype("float32"), g.standard_normal(m).astype("float32")
    for rows in (1, 3, 33):
        x = g.standard_normal((rows, k)).astype("float32")
        (y,) = call([x, w, b], [((rows, m), "float32")])
        _close(y, x @ w + b)


def test_attention_scores_symbolic_batch_and_length():
    bh, s = sym("bh"), sym("s")
    mod = relax_graph(
        [("q", [bh, s, 32], "float32"), ("k", [bh, 32, s], "float32")],
        lambda bb, q, k: bb.emit(relax.op.multiply(bb.emit(relax.op.matmul(q, k)), relax.const(0.25))),
    )
    call = compiled(schedule(Matmul(), only_prim_func(mod, "matmul")))
    g = rng(1)
    for heads, length in ((1, 1), (3, 5), (2, 33)):
        q = g.standard_normal((heads, length, 32)).astype("float32")
        k = g.standard_normal((heads, 32, length)).astype("float32")
        (y,) = call([q, k], [((heads, length, length), "float32")])
        _close(y, (q @ k) * 0.25)


def test_attention_values_symbolic_reduction():
    bh, s = sym("bh"), sym("s")
    mod = relax_graph(
        [("p", [bh, s, s], "float32"), ("v", [bh, s, 32], "float32")],
        lambda bb, p, v: bb.emit(relax.op.matmul(p, v)),
    )
    call = compiled(schedule(Matmul(), only_prim_func(mod, "matmul")))
    g = rng(2)
    for heads, length in ((1, 1), (4, 7), (2, 33)):
        p = g.standard_normal((heads, length, length)).astype("float32")
        v = g.standard_normal((heads, length, 32)).astype("float32")
        (y,) = call([p, v], [((heads, length, 32), "float32")])
        _close(y, p @ v)


def test_batched_activations_times_shared_weight():
    b, s = sym("b"), sym("s")
    mod = relax_graph(
        [("x", [b, s, 24], "float32"), ("w", [24, 32], "float32")],
        lambda bb, x, w: bb.emit(relax.op.matmul(x, w)),
    )
    call = compiled(schedule(Matmul(), only_prim_func(mod, "matmul")))
    g = rng(3)
    w = g.standard_normal((24, 32)).astype("float32")
    for batch, length in ((2, 5), (3, 1), (1, 13)):  # row tiles of 6 that wrap across the batch
        x = g.standard_normal((batch, length, 24)).astype("float32")
        (y,) = call([x, w], [((batch, length, 32), "float32")])
        _close(y, x @ w)


def test_static_shapes_that_need_no_padding():
    mod = relax_graph(
        [("x", [12, 16], "float32"), ("w", [16, 32], "float32")],
        lambda bb, x, w: bb.emit(relax.op.matmul(x, w)),
    )
    call = compiled(schedule(Matmul(), only_prim_func(mod, "matmul")))
    g = rng(4)
    x, w = g.standard_normal((12, 16)).astype("float32"), g.standard_normal((16, 32)).astype("float32")
    (y,) = call([x, w], [((12, 32), "float32")])
    _close(y, x @ w)


def test_row_major_weight_is_transposed_into_panels():
    # C[i, j] = sum_k A[i, k] * B[j, k]: the B panel is gathered across rows of B.
    n, k, m = te.var("n", "int64"), tirx.IntImm("int64", 24), tirx.IntImm("int64", 40)
    a = te.placeholder((n, k), "float32", name="a")
    b = te.placeholder((m, k), "float32", name="b")
    r = te.reduce_axis((0, k), name="r")
    c = te.compute((n, m), lambda i, j: te.sum(a[i, r] * b[j, r], axis=r), name="c")
    call = compiled(schedule(Matmul(), te.create_prim_func([a, b, c])))
    g = rng(5)
    x, w = g.standard_normal((7, 24)).astype("float32"), g.standard_normal((40, 24)).astype("float32")
    (y,) = call([x, w], [((7, 40), "float32")])
    _close(y, x @ w.T)


def test_leaves_matrix_vector_products_to_the_gemv_rule():
    mod = relax_graph(
        [("x", [1, 64], "float32"), ("w", [64, 32], "float32")],
        lambda bb, x, w: bb.emit(relax.op.matmul(x, w)),
    )
    assert Matmul().apply(only_prim_func(mod, "matmul"), AVX2, False) is None
