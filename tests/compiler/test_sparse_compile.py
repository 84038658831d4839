"""Sparse weights through the whole compiler (bitmap, magnitude pruning) on the CPU: the compiled model
computes what torch computes with the same pruned weights (pruned here by torch's topk, rounded to the
format's fp16 values), from Python and from the command line; `inspect` lists the bitmap layers with
their stored bytes; bad options are one error line and write nothing."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import tensorpress
from tensorpress import SparseConfig
from tensorpress.compiler.pruning import prune
from tensorpress.errors import ConfigError


def torch_magnitude_pruned(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, the largest K - floor(sparsity * K) |w| kept, the rest zero (torch.topk)."""
    k = w.shape[1]
    keep = k - int(np.floor(sparsity * k))
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask.scatter_(1, torch.topk(w.abs(), keep, dim=1).indices, True)
    return torch.where(mask, w, torch.zeros_like(w))


def as_stored(w: torch.Tensor) -> torch.Tensor:
    return w.to(torch.float16).to(torch.float32)  # bitmap keeps each nonzero in fp16


def test_magnitude_pruning_is_torch_topk_per_row():
    w = torch.randn(48, 200, generator=torch.Generator().manual_seed(3))
    for sparsity in (0.0, 0.5, 0.8, 0.99):
        got = prune(w.numpy(), sparsity, "magnitude")
        np.testing.assert_array_equal(got, torch_magnitude_pruned(w, sparsity).numpy())
        assert ((got != 0).sum(axis=1) == 200 - int(np.floor(sparsity * 200))).all()
    np.testing.assert_array_equal(prune(w.numpy(), 0.9, "none"), w.numpy())


def test_mlp_pruned_80_percent_matches_torch_with_the_same_weights(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval()
    x = torch.randn(5, 64)
    report = tensorpress.compile(
        model, tmp_path / "m.tpk", example_inputs=(x,), sparsity=SparseConfig(sparsity=0.8, prune="magnitude")
    )
    layers = {layer["weight"]: layer for layer in report.manifest["layers"]}
    assert {layer["stored_format"] for layer in layers.values()} == {"bitmap"}
    assert report.manifest["recipe"]["sparsity"] == {
        "kind": "sparse", "sparsity": 0.8, "format": "bitmap", "prune": "magnitude"
    }  # fmt: skip
    for layer in layers.values():  # 20% of the values in fp16 + 1 bit a weight + 4 B a tile: about 3.7x
        assert 3.3 < layer["fp16_bytes"] / layer["stored_bytes"] < 3.8
    (y,) = tensorpress.runtime.load(report.artifact).run([x.numpy()])
    with torch.no_grad():
        for linear in (model[0], model[2]):
            linear.weight.copy_(as_stored(torch_magnitude_pruned(linear.weight, 0.8)))
        want = model(x).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_sparse_options_refused_in_python(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval()
    x = (torch.randn(2, 64),)
    cases = [
        (dict(weights="fp6", sparsity=SparseConfig(0.5)), "sparse x FPx is not built yet"),
        (dict(sparsity=SparseConfig(0.5, prune="wanda")), "needs calibration data"),
        (dict(sparsity=SparseConfig(0.5, prune="sparsegpt")), "needs calibration data"),
        (dict(sparsity=SparseConfig(0.5, format="tiled-csl")), "tiled-csl .* not built yet"),
        (dict(sparsity=0.5), "must be a SparseConfig"),
        (dict(sparsity=SparseConfig(0.5), store_weights=False), "values at compile time"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message):
            tensorpress.compile(model, tmp_path / "m.tpk", example_inputs=x, **options)
    with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
        SparseConfig(1.0)
    assert not (tmp_path / "m.tpk").exists()


def _tp(*args: str):
    return subprocess.run([sys.executable, "-m", "tensorpress", *args], capture_output=True, text=True, timeout=600)


def test_cli_sparsity_matches_onnxruntime_on_the_pruned_weights_and_inspect_lists_bitmap(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    from reference_models import export_onnx

    onnx_path = export_onnx("mlp", tmp_path)
    artifact = tmp_path / "mlp_sparse.tpk"
    result = _tp("compile", str(onnx_path), "-o", str(artifact), "--sparsity", "0.8", "--prune", "magnitude",
                 "--sparse-format", "bitmap")  # fmt: skip
    assert result.returncode == 0, result.stderr
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    result = _tp("run", str(artifact), "--inputs", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz"))
    assert result.returncode == 0, result.stderr

    model = onnx.load(str(onnx_path))
    for init in model.graph.initializer:
        if init.name in ("fc1.weight", "fc2.weight"):  # [M, K]: pruned per output row
            w = torch.from_numpy(numpy_helper.to_array(init).copy())
            init.CopyFrom(numpy_helper.from_array(as_stored(torch_magnitude_pruned(w, 0.8)).numpy(), init.name))
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["y"], want, rtol=1e-4, atol=1e-5)

    listing = _tp("inspect", str(artifact)).stdout
    manifest = tensorpress.runtime.load(artifact).manifest
    for layer in manifest["layers"]:
        (line,) = [row for row in listing.splitlines() if row.strip().startswith(layer["weight"])]
        assert "bitmap" in line and f"{1 - layer['stored_bytes'] / layer['fp16_bytes']:.1%}" in line


@pytest.mark.parametrize(
    "options, message",
    [
        (["--sparsity", "1.5"], r"--sparsity must be a number in \[0, 1\)"),
        (["--sparsity", "-0.1"], r"--sparsity must be a number in \[0, 1\)"),
        (["--sparsity", "lots"], r"--sparsity must be a number in \[0, 1\)"),
        (["--sparsity", "0.8", "--weights", "fp6"], "sparse x FPx is not built yet"),
        (["--sparsity", "0.8", "--prune", "wanda"], "wanda needs calibration data; give --calibration FILE"),
        (["--prune", "magnitude"], "go with --sparsity"),
    ],
)
def test_cli_bad_sparse_options_are_one_error_line(tmp_path, options, message):
    import re

    artifact = tmp_path / "m.tpk"
    result = _tp("compile", str(tmp_path / "missing.onnx"), "-o", str(artifact), *options)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), result.stderr
    assert not artifact.exists()
