"""Property test over shapes: for each CPU rule family (matmul / GEMV, row reductions, injective maps, other
reductions) every rule of the CPU list either declines a function (None) or returns a schedule that
builds and gives numpy's answer, for any shape: dims 1..300, odd sizes, batch 1, rank 2-4.

Reproducible and cheap in the default run (derandomised, a few examples per family); set
TENSORPRESS_SHAPE_EXAMPLES=200 to search harder.
"""

from __future__ import annotations

import os
from math import prod

import numpy as np
from cpu_schedule_harness import AVX2, legalized_prim_funcs, relax_graph, run
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tvm import relax

from tensorpress.schedules.rules import rules_for

EXAMPLES = int(os.environ.get("TENSORPRESS_SHAPE_EXAMPLES", "5"))
SHAPE_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
MAX_ELEMENTS = 150_000  # keeps one example's build and run well under a second

# 1 (batch 1, the classifier head) and small odd sizes come up often; the rest spread up to 300.
dims = st.one_of(st.just(1), st.sampled_from([3, 7, 15, 17, 31, 33, 127]), st.integers(1, 300))


def shapes(min_rank: int = 2, max_rank: int = 4):
    return st.lists(dims, min_size=min_rank, max_size=max_rank).map(tuple)


def _every_rule_declines_or_matches(mod, inputs, want: np.ndarray, rtol: float = 1e-4) -> None:
    """Each rule that takes the graph's one fused function must build it to `want` (float64 numpy)."""
    (func,) = legalized_prim_funcs(mod).values()
    taken = 0
    for rule in rules_for(AVX2):
        with AVX2:
            sch = rule.apply(func, AVX2, False)
        if sch is None:
            continue
        taken += 1
        (got,) = run(sch, inputs, [(want.shape, "float32")])
        atol = rtol * max(float(np.abs(want).max()), 1.0)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=type(rule).__name__)
    assert taken, "no rule took the function (the fallback takes everything)"


def _data(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


@SHAPE_SETTINGS
@given(m=dims, k=dims, n=dims, batch=st.sampled_from([(), (1,), (3,), (1, 2)]))
def test_matmul_with_bias(m, k, n, batch):
    """x[*batch, M, K] @ w[K, N] + b[N]: Matmul, dlight's GEMV, RowReduction (M = 1) and the fallback."""
    assume(prod(batch) * m * k + k * n + prod(batch) * m * n <= MAX_ELEMENTS)
    mod = relax_graph(
        [("x", [*batch, m, k], "float32"), ("w", [k, n], "float32"), ("b", [n], "float32")],
        lambda bb, x, w, b: bb.emit(relax.op.add(relax.op.matmul(x, w), b)),
    )
    x, w, b = _data((*batch, m, k), 1), _data((k, n), 2), _data((n,), 3)
    want = x.astype(np.float64) @ w.astype(np.float64) + b
    _every_rule_declines_or_matches(mod, [x, w, b], want, rtol=1e-4)


@SHAPE_SETTINGS
@given(shape=shapes())
def test_softmax_over_the_last_axis(shape):
    assume(prod(shape) <= MAX_ELEMENTS)
    mod = relax_graph([("x", list(shape), "float32")], lambda bb, x: bb.emit(relax.op.nn.softmax(x)))
    x = _data(shape) * 3
    e = np.exp(x - x.max(axis=-1, keepdims=True)).astype(np.float64)
    _every_rule_declines_or_matches(mod, [x], e / e.sum(axis=-1, keepdims=True), rtol=1e-5)


@SHAPE_SETTINGS
@given(shape=shapes())
def test_layer_norm_over_the_last_axis(shape):
    assume(prod(shape) <= MAX_ELEMENTS)
    hidden = shape[-1]
    mod = relax_graph(
        [("x", list(shape), "float32"), ("g", [hidden], "float32"), ("beta", [hidden], "float32")],
        lambda bb, x, g, beta: bb.emit(relax.op.nn.layer_norm(x, g, beta, axes=[-1], epsilon=1e-5)),
    )
    x, g, beta = _data(shape, 1), _data((hidden,), 2), _data((hidden,), 3)
    x64 = x.astype(np.float64)
    normed = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    _every_rule_declines_or_matches(mod, [x, g, beta], normed * g + beta, rtol=1e-4)


@SHAPE_SETTINGS
@given(shape=shapes(), data=st.data())
def test_broadcast_transpose_and_exp(shape, data):
    """exp(transpose(x) + y) with y broadcast along a random subset of axes: the injective family."""
    assume(prod(shape) <= MAX_ELEMENTS)
    axes = data.draw(st.permutations(range(len(shape))))
    out_shape = tuple(shape[a] for a in axes)
    y_shape = tuple(d if data.draw(st.booleans()) else 1 for d in out_shape)
    mod = relax_graph(
        [("x", list(shape), "float32"), ("y", list(y_shape), "float32")],
        lambda bb, x, y: bb.emit(relax.op.exp(relax.op.add(relax.op.permute_dims(x, axes), y))),
    )
    x, y = _data(shape, 1), _data(y_shape, 2)
    want = np.exp(np.transpose(x, axes).astype(np.float64) + y)
    _every_rule_declines_or_matches(mod, [x, y], want, rtol=1e-5)


@SHAPE_SETTINGS
@given(shape=shapes(), data=st.data())
def test_mean_over_an_inner_axis(shape, data):
    """A reduction that is not over the last axis (global pooling, ReduceMean): the fallback family."""
    assume(prod(shape) <= MAX_ELEMENTS)
    axis = data.draw(st.integers(0, len(shape) - 1))
    mod = relax_graph(
        [("x", list(shape), "float32")], lambda bb, x: bb.emit(relax.op.mean(x, axis=[axis], keepdims=True))
    )
    x = _data(shape)
    _every_rule_declines_or_matches(mod, [x], x.astype(np.float64).mean(axis=axis, keepdims=True), rtol=1e-4)


@SHAPE_SETTINGS
@given(
    n=st.sampled_from([1, 2]),
    hw=st.tuples(st.integers(1, 23), st.integers(1, 23)),
    c=st.one_of(st.sampled_from([8, 16, 24]), st.integers(1, 40)),
    k=st.sampled_from([1, 3, 5]),
    stride=st.sampled_from([1, 2]),
    pad=st.integers(0, 2),
    dilation=st.sampled_from([1, 2]),
)
def test_depthwise_conv_channels_last(n, hw, c, k, stride, pad, dilation):
    """A channels-last depthwise conv + bias (what the conv pass leaves of MobileNet's 3x3 blocks):
    DepthwiseConv takes it when the channels fill whole vectors, the other rules otherwise."""
    h, w = hw
    span = (k - 1) * dilation + 1
    assume(h + 2 * pad >= span and w + 2 * pad >= span)
    oh, ow = (h + 2 * pad - span) // stride + 1, (w + 2 * pad - span) // stride + 1
    mod = relax_graph(
        [("x", [n, h, w, c], "float32"), ("w", [c, k, k, 1], "float32"), ("b", [1, 1, 1, c], "float32")],
        lambda bb, x, wt, b: bb.emit(
            relax.op.add(
                relax.op.nn.conv2d(
                    x, wt, strides=stride, padding=pad, dilation=dilation, groups=c,
                    data_layout="NHWC", kernel_layout="OHWI",
                ),
                b,
            )
        ),
    )  # fmt: skip
    x, wt, b = _data((n, h, w, c), 1), _data((c, k, k, 1), 2), _data((1, 1, 1, c), 3)
    padded = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    want = np.zeros((n, oh, ow, c)) + b
    for a in range(k):
        for e in range(k):
            rows = padded[:, a * dilation : a * dilation + stride * (oh - 1) + 1 : stride]
            window = rows[:, :, e * dilation : e * dilation + stride * (ow - 1) + 1 : stride]
            want += window * wt[:, a, e, 0]
    _every_rule_declines_or_matches(mod, [x, wt, b], want, rtol=1e-5)


def test_depthwise_conv_rule_takes_whole_channel_vectors():
    from tensorpress.schedules.cpu.depthwise_conv import DepthwiseConv

    def graph(c):
        return relax_graph(
            [("x", [1, 9, 9, c], "float32"), ("w", [c, 3, 3, 1], "float32")],
            lambda bb, x, wt: bb.emit(
                relax.op.nn.conv2d(x, wt, padding=1, groups=c, data_layout="NHWC", kernel_layout="OHWI")
            ),
        )

    for c, taken in [(16, True), (12, False)]:  # 12 channels: not whole AVX2 vectors, the next rule's
        (func,) = legalized_prim_funcs(graph(c)).values()
        with AVX2:
            assert (DepthwiseConv().apply(func, AVX2, False) is not None) == taken, c
