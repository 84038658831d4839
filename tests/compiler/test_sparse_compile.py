"""Sparse weights through the whole compiler (ellpack chosen by --sparse-format auto, or bitmap or
tiled-csl forced;
magnitude pruning) on the CPU: the compiled model computes what torch / onnxruntime compute with the same
pruned weights (pruned here by torch's topk, rounded to the formats' fp16 values), from Python and from
the command line; auto keeps layers dense where no sparse format saves bytes, and picks bitmap or
(very sparse) tiled-csl for CUDA; `inspect` lists each layer's format, density and stored bytes; bad
options are one error line and write nothing."""

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


@pytest.mark.parametrize("sparse_format", ["auto", "bitmap", "tiled-csl"])
def test_mlp_pruned_80_percent_matches_torch_with_the_same_weights(tmp_path, sparse_format):
    # K = 60 and M = 19: the bitmap kernel takes neither (16-row, 16-column multiples), ellpack any
    torch.manual_seed(0)
    linears = (torch.nn.Linear(60, 128), torch.nn.Linear(128, 32), torch.nn.Linear(32, 19))
    model = torch.nn.Sequential(linears[0], torch.nn.ReLU(), linears[1], torch.nn.ReLU(), linears[2]).eval()
    config = SparseConfig(sparsity=0.8, format=sparse_format, prune="magnitude")
    x = torch.randn(5, 60)
    if sparse_format != "auto":
        with pytest.warns(UserWarning, match=rf"0\.weight \[128x60\] stays dense: the {sparse_format} kernel cannot"):
            report = tensorpress.compile(model, tmp_path / "m.tpk", example_inputs=(x,), sparsity=config)
    else:
        report = tensorpress.compile(model, tmp_path / "m.tpk", example_inputs=(x,), sparsity=config)
    layers = report.manifest["layers"]
    formats = ["ellpack"] * 3 if sparse_format == "auto" else ["dense-fp32-panel", sparse_format, "dense-fp32-panel"]
    assert [layer["format"] for layer in layers] == formats
    assert report.manifest["recipe"]["sparsity"] == {
        "kind": "sparse", "sparsity": 0.8, "format": sparse_format, "prune": "magnitude"
    }  # fmt: skip
    # pruned whatever format stores it (a generic matmul, which no layer here is, would not be)
    pruned = [layer["format"] != "generic" for layer in layers]
    for layer, k, was_pruned in zip(layers, (60, 128, 32), pruned):
        assert layer.get("density") == ((k - int(np.floor(0.8 * k))) / k if was_pruned else None)
    for layer in layers:
        (m, k), keep = layer["shape"], layer["shape"][1] - int(np.floor(0.8 * layer["shape"][1]))
        if layer["format"] == "ellpack":  # 4 B a kept weight, rows in blocks of 8
            assert layer["stored_bytes"] == -(-m // 8) * 8 * keep * 4
        if layer["format"] == "bitmap":  # 2 B a kept weight + 1 bit a weight + 4 B a 16 x 64 tile
            assert layer["stored_bytes"] == pytest.approx(2 * m * keep + m * k / 8 + m * k / 256, rel=0.01)
        if layer["format"] == "tiled-csl":  # 4 B a kept weight, at most 3 padding words + 4 B offset a tile
            tiles = -(-m // 16) * -(-k // 64)
            assert 4 * m * keep < layer["stored_bytes"] <= 4 * m * keep + 16 * tiles + 4 * -(-m // 16)
    with torch.no_grad():
        for linear, layer, was_pruned in zip(linears, layers, pruned):
            w = torch_magnitude_pruned(linear.weight, 0.8) if was_pruned else linear.weight
            sparse = layer["format"] in ("ellpack", "bitmap", "tiled-csl")
            linear.weight.copy_(as_stored(w) if sparse else w)  # fp16 values
    (y,) = tensorpress.runtime.load(report.artifact).run([x.numpy()])
    with torch.no_grad():
        np.testing.assert_allclose(y, model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_layers_of_one_shape_with_different_stored_sizes_each_get_their_kernel(tmp_path):
    # K = 128: two 64-column tiles per row band, whose word counts follow the data, so the three layers'
    # stored buffers differ in size; their kernels once shared one symbol and the build failed.
    sparse_format = "tiled-csl"
    torch.manual_seed(1)
    linears = [torch.nn.Linear(128, 128, bias=False) for _ in range(3)]
    model = torch.nn.Sequential(*linears).eval()
    config = SparseConfig(sparsity=0.8, format=sparse_format, prune="magnitude")
    x = torch.randn(3, 128)
    report = tensorpress.compile(model, tmp_path / "m.tpk", example_inputs=(x,), sparsity=config)
    assert [layer["format"] for layer in report.manifest["layers"]] == [sparse_format] * 3
    with torch.no_grad():
        for linear in linears:
            linear.weight.copy_(as_stored(torch_magnitude_pruned(linear.weight, 0.8)))
        expected = model(x).numpy()
    (y,) = tensorpress.runtime.load(report.artifact).run([x.numpy()])
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_auto_keeps_dense_what_no_sparse_format_shrinks_and_picks_bitmap_for_cuda(tmp_path):
    from tensorpress.compiler.passes.rewrite_linear_to_weight_gemm import LinearSite
    from tensorpress.compiler.targets import TargetSpec
    from tensorpress.compiler.weight_plan import WeightRecipe, plan_weights

    rng = np.random.default_rng(0)
    given = rng.standard_normal((64, 256)).astype(np.float32)
    zeros = given.copy()
    zeros[:, 32:] = 0  # 87.5% zeros of its own
    weights = {"given": given, "zeros": zeros}
    sites = [LinearSite(name, 64, 256, "float32", True, None) for name in weights]
    as_given = WeightRecipe(format="auto", sparsity=None, prune="none")
    plans, _ = plan_weights(sites, as_given, TargetSpec("cpu"), weights)
    assert [(p.format, p.pruned) for p in plans] == [("dense-fp32-panel", False), ("ellpack", False)]
    assert "no sparse format stores fewer bytes" in plans[0].reason
    cuda_plans, _ = plan_weights(sites, as_given, TargetSpec("cuda", "sm_90a"), weights)
    assert [p.format for p in cuda_plans] == ["dense-fp16", "bitmap"]  # fp16 dense: 2 B a weight to beat
    # 98% zeros: tiled-csl's 4 B a nonzero beat the bitmap's bit a weight (auto weighs them by bytes)
    very = {"very": np.where(rng.random((64, 256)) < 0.02, given, 0).astype(np.float32)}
    site = [LinearSite("very", 64, 256, "float32", True, None)]
    very_plans, _ = plan_weights(site, as_given, TargetSpec("cuda", "sm_90a"), very)
    assert [p.format for p in very_plans] == ["tiled-csl"]
    pruned_plans, _ = plan_weights(sites, WeightRecipe(format="auto", sparsity=0.6), TargetSpec("cpu"), weights)
    assert [(p.format, p.pruned) for p in pruned_plans] == [("ellpack", True), ("ellpack", True)]
    with pytest.warns(UserWarning, match=r"zeros \[64x256\] stays dense: the ellpack kernel cannot take it \(no cuda"):
        forced, _ = plan_weights(sites[1:], WeightRecipe(format="ellpack", sparsity=0.6), TargetSpec("cuda"), weights)
    assert forced[0].format == "dense-fp16" and forced[0].pruned


def test_sparse_options_refused_in_python(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval()
    x = (torch.randn(2, 64),)
    cases = [
        (dict(sparsity=SparseConfig(0.5, prune="wanda")), "needs calibration data"),
        (dict(sparsity=SparseConfig(0.5, prune="sparsegpt")), "needs calibration data"),
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


@pytest.mark.parametrize("sparse_format", ["auto", "bitmap", pytest.param("tiled-csl", marks=pytest.mark.slow)])
def test_cli_sparsity_matches_onnxruntime_on_the_pruned_weights_and_inspect_lists_it(tmp_path, sparse_format):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    from reference_models import export_onnx

    onnx_path = export_onnx("mlp", tmp_path)
    artifact = tmp_path / "mlp_sparse.tpk"
    chosen = ["--sparse-format", sparse_format] if sparse_format != "auto" else []  # auto: the default
    compiled = _tp("compile", str(onnx_path), "-o", str(artifact), "--sparsity", "0.8", "--prune", "magnitude", *chosen)
    assert compiled.returncode == 0, compiled.stderr
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
        assert ("ellpack" if sparse_format == "auto" else sparse_format) in line
        assert f"{layer['density']:.1%}" in line and f"{1 - layer['stored_bytes'] / layer['fp16_bytes']:.1%}" in line
    # compile's summary: how many layers were pruned and what fraction of their weights is left
    sizes = [layer["shape"][0] * layer["shape"][1] for layer in manifest["layers"]]
    kept = sum(layer["density"] * size for layer, size in zip(manifest["layers"], sizes)) / sum(sizes)
    assert f"{len(sizes)} pruned, {kept:.1%} of their weights kept" in compiled.stdout, compiled.stdout


@pytest.mark.parametrize(
    "options, message",
    [
        (["--sparsity", "1.5"], r"--sparsity must be a number in \[0, 1\)"),
        (["--sparsity", "-0.1"], r"--sparsity must be a number in \[0, 1\)"),
        (["--sparsity", "lots"], r"--sparsity must be a number in \[0, 1\)"),
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
