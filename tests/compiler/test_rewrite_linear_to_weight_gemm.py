"""The linear rewrite with a weight that something else reads too: an embedding (an LM head tied to the
embeddings: a format that stores the weight exactly as the parameter holds it reads the parameter in
place, so the artifact holds the weight once; the outputs stay torch's), or a matmul of its transpose."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import tensorpress
from tensorpress.runtime.artifact import open_artifact


class TiedHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(256, 64)
        self.mix = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 256, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mix(self.tok(ids))))


def _tied():
    torch.manual_seed(0)
    return TiedHead().eval(), torch.randint(0, 256, (2, 8))


def test_cpu_dense_weights_read_a_tied_head_in_place(tmp_path):
    model, ids = _tied()
    report = tensorpress.compile(model, tmp_path / "t.tpk", example_inputs=(ids,), target="cpu", weights="dense-fp32")
    assert {layer["stored_format"] for layer in report.manifest["layers"]} == {"dense-fp32"}
    weights = open_artifact(report.artifact).weights()
    assert sorted(weights) == ["head.weight", "mix.bias", "mix.weight"]  # torch.export names the tied pair once
    (y,) = tensorpress.runtime.load(report.artifact).run([ids.numpy()])
    with torch.no_grad():
        np.testing.assert_allclose(y, model(ids).numpy(), rtol=1e-5, atol=1e-5)


def test_cuda_fp16_artifact_stores_a_tied_head_once(tmp_path):
    model, ids = _tied()
    report = tensorpress.compile(
        model, tmp_path / "t.tpk", example_inputs=(ids,), target="cuda:sm_90a", dtype="float16"
    )
    weights = open_artifact(report.artifact).weights()
    assert sorted(weights) == ["head.weight", "mix.bias", "mix.weight"]
    np.testing.assert_array_equal(weights["head.weight"], model.tok.weight.detach().half().numpy())
    assert {layer["stored_format"] for layer in report.manifest["layers"]} == {"dense-fp16"}
    # the head returns float32 logits: its Tensor Core GEMM writes its fp32 sums (replayed in the template tests)
    assert any("_out_float32" in kernel for kernel in report.manifest["kernels"])


def test_fp16_layer_that_widens_its_result_keeps_its_dtype(tmp_path):
    """Compiled with dtype float16, the last matmul returns float32 (the model's output dtype), and the
    numbers are torch's within fp16 rounding."""
    model, ids = _tied()
    report = tensorpress.compile(model, tmp_path / "t.tpk", example_inputs=(ids,), target="cpu", dtype="float16")
    (y,) = tensorpress.runtime.load(report.artifact).run([ids.numpy()])
    assert y.dtype == np.float32
    with torch.no_grad():
        want = model.half()(ids).float().numpy()
    np.testing.assert_allclose(y, want, rtol=2e-2, atol=2e-2)


def test_a_widening_layer_returns_its_fp32_sum_beyond_fp16_range(tmp_path):
    """The widened result is the kernel's fp32 sum, not a copy rounded through fp16 (inf above 65504)."""
    model, ids = _tied()
    with torch.no_grad():
        model.tok.weight.uniform_(200.0, 300.0)  # tied: the head's weights too; all logits ~1e6
    report = tensorpress.compile(model, tmp_path / "t.tpk", example_inputs=(ids,), target="cpu", dtype="float16")
    (y,) = tensorpress.runtime.load(report.artifact).run([ids.numpy()])
    with torch.no_grad():
        want = model.half().float()(ids).numpy()  # the fp16 weights, fp32 arithmetic
    assert np.abs(want).min() > 65504 and np.isfinite(y).all()
    np.testing.assert_allclose(y, want, rtol=1e-2)


def test_fp6_keeps_a_head_tied_to_the_embeddings_dense_whatever_its_name(tmp_path):
    """The default filter finds the tied LM head by structure (`take` reads its weight), not by name."""
    from tensorpress.compiler.formats import get_weight_format

    model, ids = _tied()
    report = tensorpress.compile(model, tmp_path / "t.tpk", example_inputs=(ids,), target="cpu", weights="fp6")
    layers = {layer["weight"]: layer for layer in report.manifest["layers"]}
    assert layers["mix.weight"]["stored_format"] == "e3m2"
    assert layers["head.weight"]["stored_format"].startswith("dense") and "take" in layers["head.weight"]["reason"]
    (y,) = tensorpress.runtime.load(report.artifact).run([ids.numpy()])
    with torch.no_grad():
        model.mix.weight.copy_(torch.from_numpy(get_weight_format("fp6").roundtrip(model.mix.weight.numpy())))
        np.testing.assert_allclose(y, model(ids).numpy(), rtol=1e-4, atol=1e-4)


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
