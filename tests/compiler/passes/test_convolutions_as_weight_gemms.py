"""Convolutions as weight GEMMs (CPU): every groups = 1 conv of a torch model becomes a linear layer over
patches, the model still equals onnxruntime, and grouped / depthwise convs stay convs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import tensorpress


class ConvZoo(nn.Module):
    """One input, every conv form the pass rewrites (and three it leaves alone), concatenated into one output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 7, stride=2, padding=3)  # 7x7 stride 2, K = 147 (not a multiple of 8)
        self.branches = nn.ModuleList(
            [
                nn.Conv2d(16, 24, 1),  # 1x1: a view, no copy
                nn.Conv2d(16, 24, 1, stride=2),  # strided 1x1: a strided slice
                nn.Conv2d(16, 24, 3, padding=1),  # 3x3, same size
                nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False),  # 3x3 stride 2, no bias
                nn.Conv2d(16, 24, 3, padding=2, dilation=2),  # dilated
                nn.Conv2d(16, 24, (1, 5), padding=(0, 2)),  # non-square kernel, per-axis padding
                nn.Conv2d(16, 24, 3, padding=1, groups=8),  # grouped: stays a conv
                nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise: stays a conv (schedules/cpu/depthwise_conv.py)
                nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16),  # depthwise, stride 2, odd output width
            ]
        )

    def forward(self, x):
        x = nn.functional.relu6(self.stem(x))  # ONNX Clip: a TIR call ConvertLayout must see through
        return torch.cat([torch.relu(conv(x)).flatten(1) for conv in self.branches], dim=1)


@pytest.fixture(scope="module")
def conv_zoo_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = ConvZoo().eval()
    path = tmp_path_factory.mktemp("conv") / "conv_zoo.onnx"
    x = torch.randn(1, 3, 30, 30)
    dynamic = {"x": {0: "n"}, "y": {0: "n"}}  # a symbolic batch: one im2col and GEMM kernel for every batch
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamic_axes=dynamic, dynamo=False)
    return path


@pytest.fixture(scope="module")
def conv_zoo_artifact(conv_zoo_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv_art") / "conv_zoo.tpress"
    report = tensorpress.compile(str(conv_zoo_onnx), out, target="cpu")
    return out, report.manifest


def test_every_groups_one_conv_is_a_weight_gemm(conv_zoo_artifact):
    _, manifest = conv_zoo_artifact
    shapes = sorted(tuple(layer["shape"]) for layer in manifest["layers"])
    # stem [16, 7*7*3] and the six groups=1 branches [24, KH*KW*16]; the grouped and depthwise convs stay convs
    expected = sorted([(16, 147), (24, 16), (24, 16), (24, 144), (24, 144), (24, 144), (24, 80)])
    assert shapes == expected


@pytest.mark.parametrize("batch", [1, 3])
def test_equals_onnxruntime(conv_zoo_onnx, conv_zoo_artifact, batch):
    path, _ = conv_zoo_artifact
    x = np.random.default_rng(batch).standard_normal((batch, 3, 30, 30)).astype(np.float32)
    expected = ort.InferenceSession(str(conv_zoo_onnx), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = tensorpress.runtime.load(path).run({"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_nan_reaches_the_same_outputs_as_onnxruntime(conv_zoo_onnx, conv_zoo_artifact):
    path, _ = conv_zoo_artifact
    x = np.random.default_rng(7).standard_normal((1, 3, 30, 30)).astype(np.float32)
    x[0, 1, 10, 20] = np.nan  # spreads through the patches that cover it, and through ReLU6 (Clip)
    expected = ort.InferenceSession(str(conv_zoo_onnx), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = tensorpress.runtime.load(path).run({"x": x})[0]
    assert np.isnan(expected).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    finite = ~np.isnan(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-4, atol=1e-4 * np.abs(expected[finite]).max())
