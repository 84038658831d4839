"""`inspect` in words that hold: sizes against fp16 read right both ways (a dense float32 build is
twice the fp16 size, not "0.50x smaller"), and an FPx layer whose K the kernel layout pads says so."""

from __future__ import annotations

import json
import re
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tensorpress
from tensorpress.runtime.inspect_artifact import describe_artifact, size_vs_fp16


@pytest.fixture(scope="module")
def two_layer_onnx(tmp_path_factory):
    """y = relu(x[batch, 64] @ w1[64, 128]) @ w2[128, 32]: K = 64 (padded by the FPx layout), then K = 128."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 128)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((128, 32)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [w1, w2],
    )
    path = tmp_path_factory.mktemp("inspect") / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def stored_code_columns(artifact, weight: str, bits: int) -> int:
    """Codes per row the artifact really stores for `weight`, from its bit planes' shapes (uint32 words)."""
    with zipfile.ZipFile(artifact) as zf:
        data = zf.read("weights.safetensors")
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    planes = {name: entry["shape"] for name, entry in header.items() if name.startswith(weight + ".plane")}
    columns = {shape[1] * 32 // int(name.rsplit("plane", 1)[1]) for name, shape in planes.items()}
    assert len(columns) == 1 and sum(int(n.rsplit("plane", 1)[1]) for n in planes) == bits
    return columns.pop()


def test_an_fpx_layer_with_padded_k_says_so(two_layer_onnx, tmp_path):
    artifact = tensorpress.compile(two_layer_onnx, tmp_path / "fp6.tpk", weights="fp6").artifact
    text = describe_artifact(artifact)
    layers = {layer["weight"]: layer for layer in json.loads(describe_artifact(artifact, as_json=True))["layers"]}
    for weight, layer in layers.items():
        (line,) = [line for line in text.splitlines() if line.strip().startswith(weight + " ")]
        k = layer["shape"][1]
        stored = stored_code_columns(artifact, weight, bits=6)
        if stored > k:
            assert f"K {k} stored padded to {stored}: {1 - k / stored:.0%} of its codes are zero padding" in line
        else:
            assert "padded" not in line
    assert {layer["shape"][1] for layer in layers.values()} == {64, 128}  # one padded layer, one not
    assert sum("stored padded" in line for line in text.splitlines()) == 1


def test_the_size_against_fp16_reads_right_both_ways(two_layer_onnx, tmp_path):
    dense = tensorpress.compile(two_layer_onnx, tmp_path / "dense.tpk")
    layers = dense.manifest["layers"]
    stored, fp16 = sum(x["stored_bytes"] for x in layers), sum(x["fp16_bytes"] for x in layers)
    assert stored == 2 * fp16  # float32 weights
    total = re.search(r"total: .*\((.*)\)$", describe_artifact(dense.artifact), re.MULTILINE).group(1)
    assert total == "2.00x the fp16 size"
    assert size_vs_fp16(3, 8) == "2.67x smaller than fp16" and size_vs_fp16(8, 8) == "the fp16 size"
