"""Valid ONNX forms TVM's converter mishandles compile after normalisation, and match onnxruntime or numpy;
forms that cannot be rewritten, empty files and missing external data are refused in one sentence."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import tensorpress
from tensorpress.errors import ModelImportError

V = helper.make_tensor_value_info


def _save(tmp_path, name, nodes, inputs, outputs, inits, opset, ir_version=None):
    graph = helper.make_graph(nodes, name, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return path


def _run(path, tmp_path, feeds):
    report = tensorpress.compile(path, tmp_path / "model.tpk")
    return tensorpress.runtime.load(report.artifact).run(feeds)


def test_initializers_listed_as_graph_inputs_are_weights(tmp_path):
    """IR 3 lists every weight in graph.input (as torch's old exporter did): a Linear layer."""
    r = np.random.default_rng(0)
    w, b = r.standard_normal((8, 10)).astype(np.float32), r.standard_normal(8).astype(np.float32)
    inputs = [V("x", TensorProto.FLOAT, [4, 10]), V("w", TensorProto.FLOAT, [8, 10]), V("b", TensorProto.FLOAT, [8])]
    gemm = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="linear")
    path = _save(tmp_path, "linear", [gemm], inputs, [V("y", 1, [4, 8])], {"w": w, "b": b}, opset=6, ir_version=3)
    x = r.standard_normal((4, 10)).astype(np.float32)
    (got,) = _run(path, tmp_path, {"x": x})
    np.testing.assert_allclose(got, x @ w.T + b, rtol=1e-5, atol=1e-5)


def test_the_callers_model_proto_is_not_changed(tmp_path):
    w = np.ones((3, 3), np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [V("x", 1, [2, 3]), V("w", 1, [3, 3])],
        [V("y", 1, [2, 3])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    before = model.SerializeToString()
    tensorpress.compile(model, tmp_path / "m.tpk")
    assert model.SerializeToString() == before


def test_slice_with_attributes_before_opset_10(tmp_path):
    node = helper.make_node("Slice", ["x"], ["y"], starts=[1, 0], ends=[3, -1], axes=[0, 2], name="cut")
    path = _save(tmp_path, "slice", [node], [V("x", 1, [4, 3, 5])], [V("y", 1, [2, 3, 4])], {}, opset=9)
    x = np.arange(60, dtype=np.float32).reshape(4, 3, 5)
    (got,) = _run(path, tmp_path, {"x": x})
    np.testing.assert_array_equal(got, x[1:3, :, 0:-1])
    (want,) = ort.InferenceSession(str(path)).run(None, {"x": x})
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (2, 3, 7)])
def test_prelu_opset6_slope_per_channel(shape, tmp_path):
    """PRelu-6 applies slope[c] along axis 1 (the channels), not numpy-style along the last axis."""
    slope = np.array([0.1, -0.5, 2.0], np.float32)
    node = helper.make_node("PRelu", ["x", "slope"], ["y"], name="act")
    path = _save(tmp_path, "prelu", [node], [V("x", 1, list(shape))], [V("y", 1, list(shape))], {"slope": slope}, 6)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    (got,) = _run(path, tmp_path, {"x": x})
    per_channel = slope.reshape(3, *([1] * (len(shape) - 2)))
    np.testing.assert_allclose(got, np.where(x < 0, x * per_channel, x), rtol=1e-6)


def test_prelu_opset6_with_a_computed_slope_is_refused(tmp_path):
    nodes = [helper.make_node("Neg", ["s"], ["slope"]), helper.make_node("PRelu", ["x", "slope"], ["y"], name="act")]
    inputs = [V("x", 1, [2, 3, 4]), V("s", 1, [3])]
    path = _save(tmp_path, "prelu_computed", nodes, inputs, [V("y", 1, [2, 3, 4])], {}, opset=6)
    with pytest.raises(ModelImportError, match=r"operator 'PRelu' \(node 'act'\) at opset 6") as err:
        tensorpress.compile(path, tmp_path / "m.tpk")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "m.tpk").exists()


def test_empty_onnx_file_is_one_sentence(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelImportError, match="is empty"):
        tensorpress.compile(path, tmp_path / "m.tpk")
    assert not (tmp_path / "m.tpk").exists()


def test_missing_external_data_names_the_missing_file(tmp_path):
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [V("x", 1, [2, 4])], [V("y", 1, [2, 4])], [w]
    )
    path = tmp_path / "ext.onnx"
    onnx.save(helper.make_model(graph), path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ModelImportError, match=r"weights\.bin, which does not exist") as err:
        tensorpress.compile(path, tmp_path / "m.tpk")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("node", "outputs"),
    [
        (helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean"], name="ln", axis=-1), ["y", "mean"]),
        (helper.make_node("Dropout", ["x"], ["y", "mask"], name="drop"), ["y", "mask"]),
    ],
)
def test_outputs_the_converter_gets_wrong_are_refused(node, outputs, tmp_path):
    """TVM's converter returns a scalar for LayerNormalization's Mean and no real Dropout mask: refused,
    naming the operator and node, instead of a silent wrong answer."""
    infos = [V(name, TensorProto.BOOL if name == "mask" else 1, None) for name in outputs]
    inits = {"g": np.ones(4, np.float32)} if node.op_type == "LayerNormalization" else {}
    path = _save(tmp_path, node.name, [node], [V("x", 1, [2, 4])], infos, inits, opset=17)
    with pytest.raises(ModelImportError, match=rf"operator '{node.op_type}' \(node '{node.name}'\) at opset 17"):
        tensorpress.compile(path, tmp_path / "m.tpk")
