"""Nodes TVM's ONNX converter turns into silently wrong answers are rewritten (frontend/onnx_rewrites.py)
and match onnxruntime, or numpy where onnxruntime lacks the form; inputs and outputs the runtime cannot
hand over (bfloat16, sequences) and RoiAlign mode=max are refused in one sentence."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import tensorpress
from tensorpress.errors import ModelImportError

V = helper.make_tensor_value_info
SPECIALS = np.array([-np.inf, -2.0, -0.5, 0.0, 0.5, 1.0, 2.0, np.inf, np.nan], np.float32)


def _model(node, inputs, outputs, opset):
    graph = helper.make_graph([node], node.op_type, inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _compiled(model, tmp_path, feeds):
    report = tensorpress.compile(model, tmp_path / "m.tpk", target="cpu")
    return tensorpress.runtime.load(report.artifact).run(feeds)[0]


def _onnxruntime(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize(("positive", "negative"), [(1, 0), (0, 1), (0, 0)])
def test_isinf_detect_attributes(positive, negative, tmp_path):
    node = helper.make_node("IsInf", ["x"], ["y"], detect_positive=positive, detect_negative=negative)
    model = _model(node, [V("x", 1, [9])], [V("y", TensorProto.BOOL, [9])], opset=10)
    np.testing.assert_array_equal(_compiled(model, tmp_path, [SPECIALS]), _onnxruntime(model, {"x": SPECIALS}))


@pytest.mark.parametrize("alpha", [1.0, -1.0])
def test_thresholded_relu_is_zero_for_minus_inf_and_nan(alpha, tmp_path):
    node = helper.make_node("ThresholdedRelu", ["x"], ["y"], alpha=alpha)
    model = _model(node, [V("x", 1, [9])], [V("y", 1, [9])], opset=10)
    want = _onnxruntime(model, {"x": SPECIALS})
    np.testing.assert_array_equal(_compiled(model, tmp_path, [SPECIALS]), want)


def test_space_to_depth_crd(tmp_path):
    node = helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=2, mode="CRD")
    model = _model(node, [V("x", 1, [2, 3, 4, 6])], [V("y", 1, [2, 12, 2, 3])], opset=25)
    x = np.arange(2 * 3 * 4 * 6, dtype=np.float32).reshape(2, 3, 4, 6)
    # ONNX: y[n, c*4 + i*2 + j, h, w] = x[n, c, 2h + i, 2w + j]
    want = x.reshape(2, 3, 2, 2, 3, 2).transpose(0, 1, 3, 5, 2, 4).reshape(2, 12, 2, 3)
    np.testing.assert_array_equal(_compiled(model, tmp_path, [x]), want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_mod_with_fmod_0_is_numpys_mod(dtype, tmp_path):
    """ONNX's Mod with fmod=0 is numpy's / Python's %, inf and zero operands included."""
    x = np.array([0, -3, 3, -1, 1, np.inf, -np.inf, 1, 1, np.nan, 1, 5.5, -5.5], dtype)
    y = np.array([-2, np.inf, np.inf, -np.inf, -np.inf, 2, 2, 0, -0.0, 2, np.nan, -2, 2], dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node("Mod", ["x", "y"], ["z"], fmod=0)
    model = _model(node, [V("x", elem, [13]), V("y", elem, [13])], [V("z", elem, [13])], opset=13)
    with np.errstate(invalid="ignore", divide="ignore"):
        want = np.mod(x, y)
    np.testing.assert_array_equal(_compiled(model, tmp_path, [x, y]), want)


@pytest.mark.parametrize("size", [3, 7])  # 3: the scalar loop (AVX2's vector shifts happen to give 0 past the width)
@pytest.mark.parametrize(("dtype", "direction"), [(np.int32, "LEFT"), (np.int32, "RIGHT"), (np.uint8, "RIGHT")])
def test_bit_shift_out_of_range_is_the_sign_fill(dtype, direction, size, tmp_path):
    """ONNX (opset 28): a shift by a negative amount or >= the bit width gives -1 for a signed right
    shift of a negative x and 0 otherwise; in range it is the ordinary shift."""
    bits = np.iinfo(dtype).bits
    x = np.array([-8, 4, -1, 5, -7, 3, 100], dtype) if dtype == np.int32 else np.array([8, 4, 1, 5, 7, 3, 200], dtype)
    y = np.array([bits, bits + 1, 100, 1, 3, 0, bits - 1], dtype)
    if dtype == np.int32:
        y[:2] = [-1, -bits]
    x, y = x[:size], y[:size]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node("BitShift", ["x", "y"], ["z"], direction=direction)
    model = _model(node, [V("x", elem, [size]), V("y", elem, [size])], [V("z", elem, [size])], opset=28)
    inside = (y >= 0) & (y < bits)
    safe = np.where(inside, y, 0).astype(dtype)
    if direction == "LEFT":
        shifted = (x.view(f"u{x.itemsize}") << safe.astype(f"u{x.itemsize}")).view(dtype)
        want = np.where(inside, shifted, 0)
    else:
        want = np.where(inside, x >> safe, np.where(x < 0, -1, 0).astype(dtype))
    np.testing.assert_array_equal(_compiled(model, tmp_path, [x, y]), want.astype(dtype))


@pytest.mark.parametrize(
    "attrs",
    [
        {"strides": [3, 2], "output_shape": [10, 8]},  # larger than the plain result: zero rows at the end
        {"strides": [2, 2], "output_shape": [5, 6], "auto_pad": "SAME_UPPER"},
        {"strides": [3, 2], "output_shape": [7, 6], "pads": [2, 0, 0, 0]},  # smaller: cropped; given pads ignored
    ],
)
def test_conv_transpose_output_shape_is_honoured(attrs, tmp_path):
    r = np.random.default_rng(0)
    x, w = r.standard_normal((1, 2, 3, 3)).astype(np.float32), r.standard_normal((2, 3, 3, 3)).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], **attrs)
    model = _model(node, [V("x", 1, [1, 2, 3, 3]), V("w", 1, [2, 3, 3, 3])], [V("y", 1, None)], opset=11)
    want = _onnxruntime(model, {"x": x, "w": w})
    assert want.shape[2:] == tuple(attrs["output_shape"])
    np.testing.assert_allclose(_compiled(model, tmp_path, [x, w]), want, rtol=1e-5, atol=1e-5)


def _one_sentence_refusal(model, tmp_path, match):
    with pytest.raises(ModelImportError, match=match) as err:
        tensorpress.compile(model, tmp_path / "m.tpk", target="cpu")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "m.tpk").exists()


def test_bfloat16_inputs_are_refused(tmp_path):
    node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)
    model = _model(node, [V("x", TensorProto.BFLOAT16, [4])], [V("y", 1, [4])], opset=13)
    _one_sentence_refusal(model, tmp_path, "graph input 'x' is bfloat16.*bfloat16 inputs are not supported")


def test_sequence_outputs_are_refused(tmp_path):
    node = helper.make_node("SplitToSequence", ["x"], ["seq"], axis=1, keepdims=0)
    seq = helper.make_tensor_sequence_value_info("seq", 1, None)
    model = _model(node, [V("x", 1, [3, 6])], [seq], opset=13)
    _one_sentence_refusal(model, tmp_path, "graph output 'seq' is an ONNX sequence")


def test_sequence_inputs_are_refused(tmp_path):
    node = helper.make_node("SequenceAt", ["seq", "i"], ["y"])
    inputs = [helper.make_tensor_sequence_value_info("seq", 1, [2]), V("i", TensorProto.INT64, [])]
    model = _model(node, inputs, [V("y", 1, [2])], opset=13)
    _one_sentence_refusal(model, tmp_path, "graph input 'seq' is an ONNX sequence")


def test_if_returning_a_sequence_is_refused(tmp_path):
    def branch(name, value):
        const = helper.make_node("Constant", [], [f"{name}_t"], value=onnx.numpy_helper.from_array(value))
        build = helper.make_node("SequenceConstruct", [f"{name}_t"], [f"{name}_out"])
        out = helper.make_tensor_sequence_value_info(f"{name}_out", 1, [2])
        return helper.make_graph([const, build], name, [], [out])

    then_branch, else_branch = branch("then", np.ones(2, np.float32)), branch("else", np.zeros(2, np.float32))
    node = helper.make_node("If", ["cond"], ["res"], then_branch=then_branch, else_branch=else_branch)
    model = _model(node, [V("cond", TensorProto.BOOL, [])], [helper.make_empty_tensor_value_info("res")], opset=13)
    _one_sentence_refusal(model, tmp_path, "graph output 'res' is an ONNX sequence")


def test_roi_align_mode_max_is_refused(tmp_path):
    node = helper.make_node("RoiAlign", ["x", "rois", "idx"], ["y"], mode="max", name="pool")
    inputs = [V("x", 1, [1, 1, 8, 8]), V("rois", 1, [1, 4]), V("idx", TensorProto.INT64, [1])]
    model = _model(node, inputs, [V("y", 1, None)], opset=16)
    _one_sentence_refusal(model, tmp_path, r"operator 'RoiAlign' \(node 'pool'\) at opset 16 .*mode=max")


def test_nodes_inside_if_branches_are_rewritten(tmp_path):
    """The rewrites reach subgraphs: an IsInf with detect_negative=0 in each branch of an If."""

    def branch(name, positive):
        isinf = helper.make_node("IsInf", ["x"], [f"{name}_y"], detect_positive=positive, detect_negative=1 - positive)
        return helper.make_graph([isinf], name, [], [V(f"{name}_y", TensorProto.BOOL, [9])])

    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", 1), else_branch=branch("else", 0))
    inputs = [V("cond", TensorProto.BOOL, []), V("x", 1, [9])]
    model = _model(node, inputs, [V("y", TensorProto.BOOL, [9])], opset=13)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": SPECIALS}
        np.testing.assert_array_equal(_compiled(model, tmp_path, list(feeds.values())), _onnxruntime(model, feeds))


@pytest.mark.parametrize("value", [None, np.array([2.5], np.float32), np.array([-7], np.int64)])
def test_constant_of_an_empty_shape_is_a_scalar(value, tmp_path):
    """ConstantOfShape of shape [] (torch's BERT export at opset 20): TVM's converter fails on it."""
    empty = helper.make_node("Constant", [], ["shape"], value=helper.make_tensor("s", TensorProto.INT64, [0], []))
    attrs = {} if value is None else {"value": onnx.numpy_helper.from_array(value, "v")}
    fill = helper.make_node("ConstantOfShape", ["shape"], ["c"], **attrs)
    dtype = np.float32 if value is None else value.dtype
    cast = helper.make_node("Cast", ["x"], ["xc"], to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    add = helper.make_node("Add", ["xc", "c"], ["y"])
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph([empty, fill, cast, add], "g", [V("x", 1, [2, 3])], [V("y", elem, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(_compiled(model, tmp_path, [x]), _onnxruntime(model, {"x": x}))
