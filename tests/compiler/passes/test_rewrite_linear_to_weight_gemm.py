"""RewriteLinearToWeightGemm on graphs whose weights are not plain one-per-layer linears, against onnxruntime."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import tensorpress
import tensorpress.runtime


def _shared_weight_model(path, gemm_first: bool) -> None:
    """One initializer W [16, 24] read as W by a MatMul (x [4, 16] -> [4, 24]) and as W^T by a Gemm with
    transB=1 (y [4, 24] -> [4, 16]): the same parameter in both orientations, at two different shapes."""
    w = np.random.default_rng(0).standard_normal((16, 24)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Gemm", ["y", "W"], ["b"], transB=1)]
    graph = helper.make_graph(
        nodes[::-1] if gemm_first else nodes,
        "shared_weight",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 24]),
        ],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [4, 24]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [4, 16]),
        ],
        [numpy_helper.from_array(w, "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("gemm_first", [False, True])
@pytest.mark.parametrize("weights", [None, "fp6"])
def test_a_weight_read_in_both_orientations_gives_both_products(tmp_path, gemm_first, weights):
    model = tmp_path / "shared.onnx"
    _shared_weight_model(model, gemm_first)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((4, 16)).astype(np.float32), "y": rng.standard_normal((4, 24)).astype(np.float32)}
    expected = ort.InferenceSession(str(model)).run(None, feeds)

    report = tensorpress.compile(model, tmp_path / "m.tpk", target="cpu", weights=weights)
    got = tensorpress.runtime.load(tmp_path / "m.tpk", device="cpu").run(feeds)

    for ours, theirs in zip(got, expected):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    (layer,) = report.manifest["layers"]
    if weights:  # a compressed format would serve only one of the two products: W stays dense, said so
        assert layer["stored_format"] == "dense-fp32-panel"
        assert "a matmul of its transpose" in layer["reason"]
