"""Classifiers users bring (ResNet-50, MobileNet-v2, DenseNet, VGG-16, AlexNet shapes, exported from torch
with a fixed batch as deployments do) compile for the CPU at batch 1 and 8 and equal onnxruntime.

The default run uses reduced widths and resolutions (the layer kinds and the batch-1 classifier head are
what broke); the published sizes run with `-m slow`."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from classifier_models import FULL, SMALL, export_classifier

import tensorpress


def _check(name: str, batch: int, tmp_path, full_size: bool) -> None:
    path, side = export_classifier(name, tmp_path, batch=batch, full_size=full_size)
    report = tensorpress.compile(path, tmp_path / f"{name}.tpk", target="cpu")
    x = np.random.default_rng(batch).standard_normal((batch, 3, side, side)).astype(np.float32)
    (got,) = tensorpress.runtime.load(report.artifact).run({"x": x})
    (want,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_reduced_classifier_matches_onnxruntime(name, batch, tmp_path):
    _check(name, batch, tmp_path, full_size=False)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_classifier_matches_onnxruntime(name, batch, tmp_path):
    _check(name, batch, tmp_path, full_size=True)
