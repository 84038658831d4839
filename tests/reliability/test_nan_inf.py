"""NaN and ±Inf in the input flow through every elementwise and reduction op the frontends emit as they
do in the reference (onnxruntime for ONNX graphs, torch for torch.export models): the same positions
are NaN, +Inf and -Inf, and the finite values agree.

One ONNX graph holds one output per op (one compile); a torch MLP (FP6 weights: the weight-GEMM path)
and a transformer block (LayerNorm, softmax attention, GELU) come through torch.export.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from reference_models import build

import tensorpress
from tensorpress.compiler.formats import get_weight_format

N, K, M = 5, 16, 64
F32 = TensorProto.FLOAT
UNARY = [
    "Relu", "Sigmoid", "Tanh", "Erf", "Exp", "Sqrt", "Abs", "Neg", "Log", "Softplus", "Elu", "Selu",
    "HardSigmoid", "HardSwish", "Floor", "Reciprocal", "Sign",
]  # fmt: skip
BINARY = ["Max", "Min", "Add", "Mul", "Div"]
REDUCTIONS = ["ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceProd", "ReduceLogSumExp"]
# onnxruntime 1.32's CPU ReduceMax/ReduceMin skip NaN; torch.amax/amin and numpy return NaN, and so do we.
NUMPY_REFERENCE = {
    "reducemax": lambda x: np.max(x, -1, keepdims=True),
    "reducemin": lambda x: np.min(x, -1, keepdims=True),
}


def _special_inputs() -> dict[str, np.ndarray]:
    """x, y: [N, K] float32; rows 0-3 of x hold NaN, +Inf, -Inf, and +Inf with -Inf; row 4 is finite in x
    and has a NaN in y only (a NaN on the right of a binary op)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, K)).astype(np.float32)
    y = rng.standard_normal((N, K)).astype(np.float32)
    x[0, 1], x[1, 2], x[2, 3], x[3, 0], x[3, 5] = np.nan, np.inf, -np.inf, np.inf, -np.inf
    y[0, 4], y[1, 2], y[1, 7], y[2, 6], y[4, 9] = np.nan, -np.inf, np.nan, np.inf, np.nan
    return {"x": x, "y": y}


def _every_op_graph() -> onnx.ModelProto:
    rng = np.random.default_rng(1)

    def tensor(name, values, dtype=F32):
        values = np.asarray(values)
        return helper.make_tensor(name, dtype, values.shape, values.ravel())

    inits = [
        tensor("lo", -0.5), tensor("hi", 0.5), tensor("zero", 0.0), tensor("two", 2.0),
        tensor("axes", [-1], TensorProto.INT64),
        tensor("gamma", rng.standard_normal(K)), tensor("beta", rng.standard_normal(K)),
        tensor("w1", rng.standard_normal((K, M)) / 4), tensor("b1", rng.standard_normal(M)),
        tensor("w2", rng.standard_normal((K, M)) / 8), tensor("w3", rng.standard_normal((M, K)) / 4),
    ]  # fmt: skip
    nodes, outputs = [], []

    def node(op, inputs, out, shape=(N, K), **attrs):
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        if shape is not None:
            outputs.append(helper.make_tensor_value_info(out, F32, list(shape)))

    for op in UNARY:
        node(op, ["x"], op.lower())
    for op in BINARY:
        node(op, ["x", "y"], op.lower())
    node("Gelu", ["x"], "gelu")
    node("Gelu", ["x"], "gelu_tanh", approximate="tanh")
    node("LeakyRelu", ["x"], "leakyrelu", alpha=0.1)
    node("Clip", ["x", "lo", "hi"], "clip")
    node("Max", ["x", "zero"], "max_with_zero")
    node("Pow", ["x", "two"], "pow")
    node("Greater", ["x", "zero"], "positive", shape=None)
    node("Where", ["positive", "x", "y"], "where")
    node("Softmax", ["x"], "softmax", axis=-1)
    node("LogSoftmax", ["x"], "logsoftmax", axis=-1)
    for op in REDUCTIONS:
        node(op, ["x", "axes"], op.lower(), shape=(N, 1), keepdims=1)
    node("LayerNormalization", ["x", "gamma", "beta"], "layernorm", axis=-1, epsilon=1e-5)
    # the case: a NaN through ReLU between two linear layers (weight-GEMM kernels)
    node("MatMul", ["x", "w1"], "h", shape=None)
    node("Add", ["h", "b1"], "hb", shape=None)
    node("Relu", ["hb"], "hr", shape=None)
    node("MatMul", ["hr", "w3"], "mlp")
    node("Gemm", ["x", "w2", "b1"], "gemm", shape=(N, M))
    inputs = [helper.make_tensor_value_info(name, F32, [N, K]) for name in ("x", "y")]
    graph = helper.make_graph(nodes, "every_op", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def assert_same_specials_and_close(got: np.ndarray, want: np.ndarray, rtol=1e-4, atol=1e-5) -> None:
    """NaN, +Inf and -Inf at exactly the same positions, finite values close."""
    assert got.shape == want.shape
    for name, where in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
        np.testing.assert_array_equal(where(got), where(want), err_msg=f"{name} positions differ")
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True)


@pytest.fixture(scope="module")
def every_op_results(tmp_path_factory) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder = tmp_path_factory.mktemp("every_op")
    model = _every_op_graph()
    onnx.checker.check_model(model)
    path = folder / "every_op.onnx"
    onnx.save(model, path)
    feed = _special_inputs()
    report = tensorpress.compile(path, folder / "every_op.tpk", target="cpu")
    got = tensorpress.runtime.load(report.artifact).run(feed)
    want = ort.InferenceSession(str(path)).run(None, feed)
    names = [out.name for out in model.graph.output]
    for name, reference in NUMPY_REFERENCE.items():
        want[names.index(name)] = reference(feed["x"])
    return {name: (g, w) for name, g, w in zip(names, got, want, strict=True)}


OUTPUTS = [op.lower() for op in UNARY + BINARY + REDUCTIONS] + [
    "gelu", "gelu_tanh", "leakyrelu", "clip", "max_with_zero", "pow", "where", "softmax", "logsoftmax",
    "layernorm", "mlp", "gemm",
]  # fmt: skip


@pytest.mark.parametrize("output", OUTPUTS)
def test_onnx_op_keeps_nan_and_inf_like_onnxruntime(every_op_results, output):
    got, want = every_op_results[output]
    assert_same_specials_and_close(got, want)


def test_nan_through_relu_between_linear_layers_stays_nan(every_op_results):
    """The reported case: row 0's NaN must not come out of ReLU as 0 (a finite row equal to the bias)."""
    got, _ = every_op_results["mlp"]
    assert np.isnan(got[0]).all() and np.isfinite(got[4]).all()


def _torch_input(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn((4, 64) if name == "mlp" else (2, 8, 64), generator=g)
    flat = x.view(-1, 64)
    flat[0, 3], flat[1, 5], flat[2, 7], flat[2, 9] = float("nan"), float("inf"), float("-inf"), float("inf")
    return x


@pytest.mark.parametrize("name, weights", [("mlp", "fp6"), ("block", None)])
def test_torch_export_model_keeps_nan_and_inf_like_torch(tmp_path, name, weights):
    """torch.export models: an MLP with FP6 weights (the FPx weight GEMM; torch runs decode(encode(W)))
    and a transformer block, whose attention spreads a token's NaN to every token of its sequence."""
    module = build(name)
    x = _torch_input(name)
    report = tensorpress.compile(module, tmp_path / f"{name}.tpk", example_inputs=(x,), weights=weights)
    (got,) = tensorpress.runtime.load(report.artifact).run([x.numpy()])
    if weights is not None:
        fmt = get_weight_format(weights)
        with torch.no_grad():
            for layer in (module.fc1, module.fc2):
                layer.weight.copy_(torch.from_numpy(fmt.roundtrip(layer.weight.numpy())))
    with torch.no_grad():
        want = module(x).numpy()
    assert np.isnan(want).any() and np.isfinite(want).any()  # the input reaches both kinds of rows
    assert_same_specials_and_close(got, want, rtol=1e-4, atol=1e-4)
