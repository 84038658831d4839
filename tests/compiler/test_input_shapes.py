"""Input-shape overrides are checked at the API edge, before any import or build: a negative, empty or
mismatched dim is one sentence (the CLI's --input-shape goes through the same check)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tensorpress
from tensorpress.errors import ConfigError


@pytest.fixture(scope="module")
def matmul_onnx(tmp_path_factory):
    """y[batch, 8] = x[batch, 64] @ w[64, 8]."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [w],
    )
    path = tmp_path_factory.mktemp("shapes") / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def no_import(monkeypatch):
    """Fail the test if the compile gets as far as importing the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was imported before the input shapes were checked")

    monkeypatch.setattr("tensorpress.frontend.import_model", refuse)


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"x": [-1, 64]}, r"input shape x=\[-1, 64\]: axis 0 is -1; sizes must be 1 or more\.$"),
        ({"x": [0, 64]}, r"axis 0 is 0; sizes must be 1 or more\.$"),
        ({"x": [2, 65]}, r"x=\[2, 65\] does not fit the model's input x=\[batch, 64\]: axis 1 is fixed at 64\.$"),
        ({"x": [2, 64, 3]}, r"x=\[2, 64, 3\] has 3 dims, but the model's input x has 2: x=\[batch, 64\]\.$"),
        ({"x": [1, ""]}, r"axis 1 is '', neither a size nor a name such as 'batch'\.$"),
        ({"x": []}, r"input shape x=\[\] must be a non-empty list of dims"),
        ({"x": [1.5, 64]}, r"axis 0 must be a size or a name, not 1\.5\.$"),
    ],
)
def test_bad_input_shapes_are_refused_before_the_import(matmul_onnx, tmp_path, no_import, shapes, message):
    with pytest.raises(ConfigError, match=message):
        tensorpress.compile(matmul_onnx, tmp_path / "m.tpk", input_shapes=shapes)
    assert list(tmp_path.iterdir()) == []


def test_models_other_than_onnx_graphs_take_no_input_shapes(tmp_path, no_import):
    torch = pytest.importorskip("torch")
    with pytest.raises(ConfigError, match="input shapes can be overridden for ONNX graphs only"):
        tensorpress.compile(
            torch.nn.Linear(4, 2), tmp_path / "m.tpk", example_inputs=(torch.zeros(1, 4),), input_shapes={"x": [1, 4]}
        )


def test_a_valid_override_fixes_the_symbolic_dim(matmul_onnx, tmp_path):
    report = tensorpress.compile(matmul_onnx, tmp_path / "m.tpk", input_shapes={"x": [3, 64]})
    assert report.manifest["inputs"][0]["shape"] == [3, 64]
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    w = numpy_helper.to_array(onnx.load(matmul_onnx).graph.initializer[0])
    (y,) = tensorpress.runtime.load(report.artifact).run({"x": x})
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)
