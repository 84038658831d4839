"""ONNX models compiled for the CPU match onnxruntime; unsupported operators fail before any work."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from reference_models import example_inputs, export_onnx

import tensorpress
from tensorpress.errors import ModelImportError, UnsupportedOperatorError


@pytest.mark.parametrize("name", ["mlp", "convnet", "block"])
def test_onnx_model_matches_onnxruntime(name, tmp_path):
    path = export_onnx(name, tmp_path)
    report = tensorpress.compile(path, tmp_path / f"{name}.tpk", target="cpu")
    model = tensorpress.runtime.load(report.artifact)
    x = example_inputs(name)[0].numpy()
    x = np.concatenate([x, x[:1] * 0.5])  # another batch size than the export's: batch stays symbolic
    (got,) = model.run({"x": x})
    (want,) = ort.InferenceSession(str(path)).run(None, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_onnx_gelu_opset20_symbolic_batch(tmp_path):
    """A graph written with onnx.helper: MatMul with an initializer ([K, M] layout), Add, Gelu (opset 20)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 48)).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
            helper.make_node("Gelu", ["hb"], ["y"], name="gelu"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 48])],
        [
            helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel()),
            helper.make_tensor("b", TensorProto.FLOAT, b.shape, b),
        ],
    )
    path = tmp_path / "gelu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
    report = tensorpress.compile(path, tmp_path / "gelu.tpk")
    assert [layer["format"] for layer in report.manifest["layers"]] == ["dense-fp32-panel"]
    x = rng.standard_normal((5, 32)).astype(np.float32)
    (got,) = tensorpress.runtime.load(report.artifact).run([x])
    (want,) = ort.InferenceSession(str(path)).run(None, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_unsupported_onnx_operator_names_op_and_node(tmp_path):
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="ok"),
            helper.make_node("MyCustomOp", ["r"], ["y"], name="weird"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(UnsupportedOperatorError, match=r"'MyCustomOp' \(node 'weird', #1 in graph\)"):
        tensorpress.compile(path, tmp_path / "bad.tpk")
    assert not (tmp_path / "bad.tpk").exists()


def test_truncated_onnx_file_is_a_model_error(tmp_path):
    good = export_onnx("mlp", tmp_path)
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ModelImportError, match="could not be read as an ONNX model"):
        tensorpress.compile(bad, tmp_path / "out.tpk")
