"""The runtime's hand-off of numpy arrays to TVM (runtime/tvm_runtime.py)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

import tensorpress


def test_a_zero_size_input_runs(tmp_path):
    """numpy gives a zero-size array non-compact strides, which a compiled kernel rejects; the runtime
    hands TVM an empty tensor instead, and the model returns onnxruntime's (empty) answer."""
    V = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Trilu", ["x", "k"], ["y"], upper=0)],
        "tril",
        [V("x", TensorProto.INT64, [3, 0, 5]), V("k", TensorProto.INT64, [])],
        [V("y", TensorProto.INT64, [3, 0, 5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    x, k = np.empty((3, 0, 5), np.int64), np.array(1, np.int64)
    report = tensorpress.compile(model, tmp_path / "m.tpk", target="cpu")
    (got,) = tensorpress.runtime.load(report.artifact).run([x, k])
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x, "k": k})[0]
    assert got.shape == want.shape == (3, 0, 5) and got.dtype == want.dtype
