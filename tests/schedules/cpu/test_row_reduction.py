"""The CPU row-reduction schedule against numpy: softmax, layer norm, RMS norm, symbolic rows."""

import numpy as np
import pytest
import tvm_ffi
from cpu_schedule_harness import AVX2, compiled, only_prim_func, relax_graph, rng, schedule, sym
from tvm import relax, s_tir, te, tirx
from tvm.script import tirx as T

from tensorpress.schedules.cpu.fallback import Fallback
from tensorpress.schedules.cpu.row_reduction import RowReduction


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_softmax_over_a_symbolic_row():
    b, s = sym("b"), sym("s")
    mod = relax_graph([("x", [b, 12, s, s], "float32")], lambda bb, x: bb.emit(relax.op.nn.softmax(x)))
    call = compiled(schedule(RowReduction(), only_prim_func(mod)))
    for batch, length in ((1, 1), (2, 5), (1, 33)):
        x = rng(length).standard_normal((batch, 12, length, length)).astype("float32") * 4
        (y,) = call([x], [(x.shape, "float32")])
        np.testing.assert_allclose(y, _softmax(x.astype(np.float64)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hidden", [384, 40, 12])
def test_layer_norm(hidden):
    # 384 and 40: vector partial sums (multiples of 8 lanes); 12: a scalar reduction.
    b, s = sym("b"), sym("s")
    mod = relax_graph(
        [("x", [b, s, hidden], "float32"), ("g", [hidden], "float32"), ("beta", [hidden], "float32")],
        lambda bb, x, g, beta: bb.emit(relax.op.nn.layer_norm(x, g, beta, axes=[-1], epsilon=1e-12)),
    )
    sch = schedule(RowReduction(), only_prim_func(mod))
    if hidden % 8 == 0:
        assert "T.vectorized" in sch.mod["main"].script()
    call = compiled(sch)
    r = rng(hidden)
    g, beta = r.standard_normal(hidden).astype("float32"), r.standard_normal(hidden).astype("float32")
    for batch, length in ((1, 1), (2, 7)):
        x = (r.standard_normal((batch, length, hidden)) * 3 + 1).astype("float32")
        (y,) = call([x, g, beta], [(x.shape, "float32")])
        x64 = x.astype(np.float64)
        mean, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
        np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var + 1e-12) * g + beta, rtol=1e-4, atol=1e-4)


def test_rms_norm():
    n = sym("n")
    mod = relax_graph(
        [("x", [n, 64], "float32"), ("w", [64], "float32")],
        lambda bb, x, w: bb.emit(relax.op.nn.rms_norm(x, w, axes=[-1], epsilon=1e-6)),
    )
    call = compiled(schedule(RowReduction(), only_prim_func(mod)))
    r = rng(7)
    x, w = r.standard_normal((5, 64)).astype("float32"), r.standard_normal(64).astype("float32")
    (y,) = call([x, w], [(x.shape, "float32")])
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(y, x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6) * w, rtol=1e-5)


def test_declines_a_lone_reduction_and_elementwise_functions():
    x = te.placeholder((8, 8), "float32", name="x")
    k = te.reduce_axis((0, 8), name="k")
    total = te.compute((8,), lambda i: te.sum(x[i, k], axis=k), name="total")
    assert RowReduction().apply(te.create_prim_func([x, total]), AVX2, False) is None
    y = te.compute((8, 8), lambda i, j: x[i, j] * 2.0, name="y")
    assert RowReduction().apply(te.create_prim_func([x, y]), AVX2, False) is None


@pytest.mark.parametrize("shape", [(1, 10), (1, 1000), (1, 1, 16), (2, 1, 16)])
def test_softmax_with_unit_rows_declines_or_builds(shape):
    """Batch 1: the elementwise blocks lose their unit axes and the row loop is the column loop; the rule
    declines the single row (the fallback takes it) and builds the others to numpy's answer."""
    mod = relax_graph([("x", list(shape), "float32")], lambda bb, x: bb.emit(relax.op.nn.softmax(x)))
    func = only_prim_func(mod)
    sch = RowReduction().apply(func, AVX2, False)
    x = rng(1).standard_normal(shape).astype("float32")
    if int(np.prod(shape[:-1])) == 1:
        assert sch is None
        return
    (y,) = compiled(sch)([x], [(shape, "float32")])
    np.testing.assert_allclose(y, _softmax(x.astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_matrix_vector_product_with_bias_keeps_its_rows_scalar():
    """x[1, K] @ w[K, N] + b: each of the N outputs is a row of the reduction and the epilogue has no axis
    beyond it; vectorising that row loop (which holds the reductions) failed TVM's build."""
    mod = relax_graph(
        [("x", [1, 64], "float32"), ("w", [64, 10], "float32"), ("b", [10], "float32")],
        lambda bb, x, w, b: bb.emit(relax.op.add(relax.op.matmul(x, w), b)),
    )
    sch = schedule(RowReduction(), only_prim_func(mod))
    r = rng(2)
    x, w, b = (r.standard_normal(s).astype("float32") for s in ((1, 64), (64, 10), (10,)))
    (y,) = compiled(sch)([x, w, b], [((1, 10), "float32")])
    np.testing.assert_allclose(y, x @ w + b, rtol=1e-5, atol=1e-5)


@T.prim_func(s_tir=True)
def _row_sum_and_centred(
    A: T.Buffer((64, 128), "float32"), S: T.Buffer((64,), "float32"), C: T.Buffer((64, 128), "float32")
):
    T.func_attr({"tirx.noalias": True})
    for i, k in T.grid(64, 128):
        with T.sblock("sum"):
            vi, vk = T.axis.remap("SR", [i, k])
            with T.init():
                S[vi] = T.float32(0)
            S[vi] = S[vi] + A[vi, vk]
    for i, j in T.grid(64, 128):
        with T.sblock("centre"):
            vi, vj = T.axis.remap("SS", [i, j])
            C[vi, vj] = A[vi, vj] - S[vi]


def test_declines_a_reduction_that_is_also_an_output():
    """The row sum is an output of the function (AlexNet / Inception graphs fuse such pairs): TVM cannot
    compute an output block inside the row loop, so the rule answers None for the fallback instead of
    raising "block is an output block"."""
    assert RowReduction().apply(_row_sum_and_centred, AVX2, False) is None
    a = rng(3).standard_normal((64, 128)).astype("float32")
    s, c = compiled(schedule(Fallback(), _row_sum_and_centred))([a], [((64,), "float32"), ((64, 128), "float32")])
    np.testing.assert_allclose(s, a.sum(axis=1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(c, a - a.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-4)


def _masked_softmax_func(heads: int | None):
    """softmax over the last axis, then rows whose mask is set zeroed: the chain MiniLM's attention
    fuses (max, x - max, exp, sum, divide, where), on symbolic rows and row length; with `heads`, a
    constant axis after the batch ([b, heads, n, n], the rows then go over the cores in stages)."""
    b, n = sym("b"), sym("n")
    lead = (b,) if heads is None else (b, heads)
    x = te.placeholder((*lead, n, n), "float32", name="x")
    mask = te.placeholder((*lead, n, 1), "int8", name="mask")
    k = te.reduce_axis((0, n), name="k")
    top = te.compute((*lead, n), lambda *r: te.max(x[(*r, k)], axis=k), name="top")
    delta = te.compute(x.shape, lambda *i: x[i] - top[i[:-1]], name="delta")
    e = te.compute(x.shape, lambda *i: te.exp(delta[i]), name="e")
    k2 = te.reduce_axis((0, n), name="k2")
    total = te.compute((*lead, n), lambda *r: te.sum(e[(*r, k2)], axis=k2), name="total")
    norm = te.compute(x.shape, lambda *i: e[i] / total[i[:-1]], name="norm")
    zero = te.compute(x.shape, lambda *i: tirx.const(0.0, "float32"), name="zero")
    out = te.compute(x.shape, lambda *i: tirx.Select(mask[(*i[:-1], 0)] != 0, zero[i], norm[i]), name="out")
    return te.create_prim_func([x, mask, out])


@pytest.mark.parametrize("heads", [None, 3])
def test_masked_softmax_keeps_only_the_exponentials_between_steps(heads):
    """The elementwise steps that feed only elementwise steps (x - max, divide, zero, where) are folded
    into their consumers: the one whole-tensor intermediate left is exp, which the sum reads. With a
    constant heads axis the max and the sum are vector partial results (the row's tail masked)."""
    sch = schedule(RowReduction(), _masked_softmax_func(heads))
    whole = str(list(sch.mod["main"].params[0].shape))
    allocated = [buf.name for blk in _blocks(sch.mod["main"]) for buf in blk.alloc_buffers]
    assert [name for name in allocated if str(list(_buffer(sch, name).shape)) == whole] == ["e"]
    if heads is not None:
        assert {"top.rf", "total.rf"} <= set(allocated)
    call = compiled(sch)
    r = rng(11)
    for batch, length in ((1, 1), (2, 5), (1, 33)):
        lead = (batch,) if heads is None else (batch, heads)
        x = (r.standard_normal((*lead, length, length)) * 4).astype("float32")
        mask = (r.random((*lead, length, 1)) < 0.3).astype("int8")
        (y,) = call([x, mask], [(x.shape, "float32")])
        want = np.where(mask != 0, 0.0, _softmax(x.astype(np.float64)))
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def _buffer(sch, name):
    return next(buf for blk in _blocks(sch.mod["main"]) for buf in blk.alloc_buffers if buf.name == name)


def _blocks(func):
    found = []
    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, found.append)])
    return found


def test_softmax_exp_runs_in_vectors_not_a_libm_call_per_element():
    # exp is `vector_exp`'s arithmetic (<= 2 ulp); a masked score (-inf) still gives 0, a NaN row NaN
    b, s = sym("b"), sym("s")
    mod = relax_graph([("x", [b, 12, s, s], "float32")], lambda bb, x: bb.emit(relax.op.nn.softmax(x)))
    sch = schedule(RowReduction(), only_prim_func(mod))
    assert "T.exp(" not in sch.mod["main"].script()
    x = rng(7).standard_normal((1, 12, 19, 19)).astype("float32") * 30
    x[0, :, :, 5] = -np.inf
    x[0, 3, 4, 2] = np.nan
    (y,) = compiled(sch)([x], [(x.shape, "float32")])
    want = _softmax(x.astype(np.float64))
    assert np.isnan(y[0, 3, 4]).all() and (y[0, :, :, 5][~np.isnan(y[0, :, :, 5])] == 0).all()
    finite = ~np.isnan(want)
    np.testing.assert_allclose(y[finite], want[finite], rtol=1e-5, atol=1e-7)
