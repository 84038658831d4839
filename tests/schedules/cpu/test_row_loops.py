"""RowLoops (row-wise normalisations over rows of symbolic length, written out) against numpy/torch:
softmax with MiniLM's fully-masked-row epilogue and the row flag it reads, layer norm, a row sum; rows
shorter than, equal to and not a multiple of the vector width."""

import numpy as np
import pytest
import torch
from cpu_schedule_harness import AVX2, compiled, only_prim_func, relax_graph, rng, schedule, sym
from tvm import relax, te, tirx

from tensorpress.schedules.cpu.row_loops import RowLoops

LENGTHS = ((1, 1), (2, 5), (1, 8), (2, 13), (1, 33), (1, 128))  # (batch, row length): tails of 0 to 7


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _safe_softmax_func(heads: int):
    """What MiniLM's attention fuses after QK^T + mask (torch's SDPA decomposition, HF's BERT): each
    row's flag "some score is not -inf", computed by a kernel of its own, then softmax with the rows
    lacking it set to 0 (where torch.softmax gives NaN)."""
    b, n = sym("b"), sym("n")
    x = te.placeholder((b, heads, n, n), "float32", name="x")
    flag = te.placeholder((b, heads, n, 1), "int8", name="flag")
    k = te.reduce_axis((0, n), name="k")
    top = te.compute((b, heads, n), lambda i, h, r: te.max(x[i, h, r, k], axis=k), name="top")
    delta = te.compute(x.shape, lambda *i: x[i] - top[i[:-1]], name="delta")
    e = te.compute(x.shape, lambda *i: te.exp(delta[i]), name="e")
    k2 = te.reduce_axis((0, n), name="k2")
    total = te.compute((b, heads, n), lambda i, h, r: te.sum(e[i, h, r, k2], axis=k2), name="total")
    norm = te.compute(x.shape, lambda *i: e[i] / total[i[:-1]], name="norm")
    masked = te.compute(x.shape[:-1] + [1], lambda *i: tirx.Not(flag[i].astype("bool")), name="masked")
    zero = te.compute(x.shape, lambda *i: tirx.const(0.0, "float32"), name="zero")
    out = te.compute(x.shape, lambda *i: tirx.Select(masked[(*i[:-1], 0)], zero[i], norm[i]), name="out")
    return te.create_prim_func([x, flag, out])


def _torch_safe_softmax(x: np.ndarray) -> np.ndarray:
    """torch's softmax, with the rows whose scores are all -inf 0 (what HF's SDPA path asks of it)."""
    y = torch.softmax(torch.from_numpy(x).double(), dim=-1)
    return torch.where(torch.isneginf(torch.from_numpy(x)).all(-1, keepdim=True), 0.0, y).numpy()


def test_masked_softmax_matches_torch_with_fully_masked_rows():
    sch = schedule(RowLoops(), _safe_softmax_func(3))
    script = sch.mod["main"].script()
    assert "T.parallel" in script and "T.vectorized" in script
    call = compiled(sch)
    r = rng(21)
    for batch, length in LENGTHS:
        x = (r.standard_normal((batch, 3, length, length)) * 4).astype("float32")
        x[..., r.random((batch, 3, length, length)) < 0.3] = -np.inf  # padding columns of the mask
        x[0, 1, 0, :] = -np.inf  # a row with every key masked
        flag = (~np.isneginf(x).all(-1, keepdims=True)).astype("int8")
        (y,) = call([x, flag], [(x.shape, "float32")])
        np.testing.assert_allclose(y, _torch_safe_softmax(x), rtol=1e-5, atol=1e-6)
        assert (y[0, 1, 0] == 0).all()


def test_plain_softmax_over_symbolic_rows():
    b, s = sym("b"), sym("s")
    mod = relax_graph([("x", [b, 12, s, s], "float32")], lambda bb, x: bb.emit(relax.op.nn.softmax(x)))
    sch = schedule(RowLoops(), only_prim_func(mod))
    assert "T.exp(" not in sch.mod["main"].script()  # vector_exp's arithmetic
    call = compiled(sch)
    for batch, length in LENGTHS:
        x = rng(length).standard_normal((batch, 12, length, length)).astype("float32") * 4
        (y,) = call([x], [(x.shape, "float32")])
        np.testing.assert_allclose(y, _softmax(x.astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_layer_norm_over_a_symbolic_row():
    """Two sums and a per-row mean between them: a scalar step of each row."""
    n, h = sym("n"), sym("h")
    mod = relax_graph(
        [("x", [n, h], "float32"), ("g", [h], "float32"), ("beta", [h], "float32")],
        lambda bb, x, g, beta: bb.emit(relax.op.nn.layer_norm(x, g, beta, axes=[-1], epsilon=1e-5)),
    )
    call = compiled(schedule(RowLoops(), only_prim_func(mod)))
    r = rng(5)
    for rows, hidden in ((3, 7), (4, 40), (2, 389)):
        x = (r.standard_normal((rows, hidden)) * 3 + 1).astype("float32")
        g, beta = r.standard_normal(hidden).astype("float32"), r.standard_normal(hidden).astype("float32")
        (y,) = call([x, g, beta], [(x.shape, "float32")])
        want = torch.nn.functional.layer_norm(
            torch.from_numpy(x).double(), (hidden,), torch.from_numpy(g).double(), torch.from_numpy(beta).double(), 1e-5
        )
        np.testing.assert_allclose(y, want.numpy(), rtol=1e-4, atol=1e-4)


def _row_flag_func():
    """MiniLM's other kernel on the scores: per row, whether some score is not -inf (max of an int8
    cast), the flag the masked softmax reads."""
    b, n = sym("b"), sym("n")
    x = te.placeholder((b, 3, n, n), "float32", name="x")
    finite = te.compute(x.shape, lambda *i: tirx.Not(x[i] == tirx.const(-np.inf, "float32")), name="finite")
    as_int = te.compute(x.shape, lambda *i: finite[i].astype("int8"), name="as_int")
    k = te.reduce_axis((0, n), name="k")
    flag = te.compute((b, 3, n, 1), lambda i, h, r, _: te.max(as_int[i, h, r, k], axis=k), name="flag")
    return te.create_prim_func([x, flag])


def test_row_flag_of_fully_masked_rows():
    sch = schedule(RowLoops(), _row_flag_func())
    call = compiled(sch)
    r = rng(4)
    for batch, length in LENGTHS:
        x = r.standard_normal((batch, 3, length, length)).astype("float32")
        x[r.random(x.shape) < 0.5] = -np.inf
        x[0, 2, length - 1, :] = -np.inf
        (flag,) = call([x], [((batch, 3, length, 1), "int8")])
        np.testing.assert_array_equal(flag, (~np.isneginf(x)).any(-1, keepdims=True).astype("int8"))


def test_row_sum_over_a_symbolic_row():
    n = sym("n")
    x = te.placeholder((5, n), "float32", name="x")
    k = te.reduce_axis((0, n), name="k")
    total = te.compute((5,), lambda i: te.sum(x[i, k], axis=k), name="total")
    call = compiled(schedule(RowLoops(), te.create_prim_func([x, total])))
    for length in (1, 7, 8, 70):
        a = rng(length).standard_normal((5, length)).astype("float32")
        (y,) = call([a], [((5,), "float32")])
        np.testing.assert_allclose(y, a.astype(np.float64).sum(-1), rtol=1e-5, atol=1e-5)


def test_declines_constant_rows_and_elementwise_functions():
    """Constant-length rows stay with RowReduction's schedule (measured the same on layer norm 128 x 384);
    an elementwise function is no row program."""
    mod = relax_graph([("x", [4, 16], "float32")], lambda bb, x: bb.emit(relax.op.nn.softmax(x)))
    assert RowLoops().apply(only_prim_func(mod), AVX2, False) is None
    n = sym("n")
    x = te.placeholder((4, n), "float32", name="x")
    y = te.compute((4, n), lambda i, j: x[i, j] * 2.0, name="y")
    assert RowLoops().apply(te.create_prim_func([x, y]), AVX2, False) is None


def test_declines_an_intermediate_read_at_another_element():
    """A step reading the previous elementwise step at another position (here the row reversed) cannot
    read it from the output row, which is being overwritten."""
    n = sym("n")
    x = te.placeholder((4, n), "float32", name="x")
    k = te.reduce_axis((0, n), name="k")
    top = te.compute((4,), lambda i: te.max(x[i, k], axis=k), name="top")
    e = te.compute((4, n), lambda i, j: te.exp(x[i, j] - top[i]), name="e")
    k2 = te.reduce_axis((0, n), name="k2")
    total = te.compute((4,), lambda i: te.sum(e[i, k2], axis=k2), name="total")
    out = te.compute((4, n), lambda i, j: e[i, n - 1 - j] / total[i], name="out")
    assert RowLoops().apply(te.create_prim_func([x, out]), AVX2, False) is None


@pytest.mark.parametrize("length", [3, 16, 29])
def test_softmax_of_infinite_and_nan_scores(length):
    """A -inf score gives 0, a row holding NaN gives NaN (as torch.softmax)."""
    b, s = sym("b"), sym("s")
    mod = relax_graph([("x", [b, 2, s, s], "float32")], lambda bb, x: bb.emit(relax.op.nn.softmax(x)))
    call = compiled(schedule(RowLoops(), only_prim_func(mod)))
    x = rng(length).standard_normal((1, 2, length, length)).astype("float32") * 30
    x[0, :, :, 1] = -np.inf
    x[0, 1, 2, length - 1] = np.nan
    (y,) = call([x], [(x.shape, "float32")])
    want = torch.softmax(torch.from_numpy(x).double(), dim=-1).numpy()
    assert np.isnan(y[0, 1, 2]).all()
    finite = ~np.isnan(want)
    np.testing.assert_allclose(y[finite], want[finite], rtol=1e-5, atol=1e-7)
    assert (y[0, :, :, 1][~np.isnan(want[0, :, :, 1])] == 0).all()
