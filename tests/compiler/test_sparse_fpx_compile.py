"""Sparse x FPx through the whole compiler (`--weights fp6 --sparsity 0.8`): each linear weight pruned by
magnitude and stored as bitmap-e3m2 (the bitmap + FP6 codes + a scale per row) computes, on the CPU,
what torch / onnxruntime compute with the same weights pruned by torch's topk and quantised by FP6;
`inspect` lists the format, density and bytes; auto weighs bitmap-e3m2 against plain FP6 per layer on
CUDA (and keeps FP6 on the CPU, saying why); bad combinations are one error line and write nothing."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import tensorpress
from tensorpress import SparseConfig
from tensorpress.compiler.compression_configs import FPxConfig
from tensorpress.compiler.formats import get_weight_format
from tensorpress.errors import ConfigError


def pruned_and_fp6(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """torch's topk magnitude pruning per output row, then FP6 e3m2 with absmax row scales."""
    keep = w.shape[1] - int(np.floor(sparsity * w.shape[1]))
    mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, torch.topk(w.abs(), keep, dim=1).indices, True)
    pruned = torch.where(mask, w, torch.zeros_like(w))
    return torch.from_numpy(get_weight_format("fp6").roundtrip(pruned.numpy()))


def test_fpx_and_sparse_configs_together_match_torch(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 48)).eval()
    x = torch.randn(5, 64)
    report = tensorpress.compile(
        model,
        tmp_path / "m.tpk",
        example_inputs=(x,),
        weights=FPxConfig(3, 2),
        sparsity=SparseConfig(0.8, format="bitmap"),
    )
    layers = report.manifest["layers"]
    assert [layer["format"] for layer in layers] == ["bitmap-e3m2"] * 2
    for layer in layers:
        (m, k), keep = layer["shape"], layer["shape"][1] - int(np.floor(0.8 * layer["shape"][1]))
        assert layer["density"] == pytest.approx(keep / k, abs=1e-9)
        # 0.75 B a kept weight (the stream padded to 128 codes) + 1 bit a weight + 4 B a tile + 2 B a row
        assert layer["stored_bytes"] == pytest.approx(0.75 * m * keep + m * k / 8 + m * k / 256 + 2 * m, abs=100)
    with torch.no_grad():
        for linear in (model[0], model[2]):
            linear.weight.copy_(pruned_and_fp6(linear.weight, 0.8))
        want = model(x).numpy()
    (y,) = tensorpress.runtime.load(report.artifact).run([x.numpy()])
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_auto_weighs_bitmap_fpx_against_plain_fpx():
    from tensorpress.compiler.passes.rewrite_linear_to_weight_gemm import LinearSite
    from tensorpress.compiler.targets import TargetSpec
    from tensorpress.compiler.weight_plan import WeightRecipe, plan_weights

    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    sites = [LinearSite("w", 64, 256, "float32", True, None)]
    cuda = TargetSpec("cuda", "sm_90a")

    def plan(sparsity: float, target=cuda):
        recipe = WeightRecipe(format="auto", values="e3m2", sparsity=sparsity)
        return plan_weights(sites, recipe, target, {"w": w})[0][0]

    # 83% dense breaks even with FP6 (0.75 B a nonzero + 1/8 B a weight < 0.75 B a weight)
    assert plan(0.8).format == "bitmap-e3m2" and plan(0.8).pruned
    assert plan(0.1).format == "e3m2" and plan(0.1).pruned  # pruned, then plain FP6: fewer bytes
    assert "no sparse format of e3m2 values stores fewer bytes" in plan(0.1).reason
    on_cpu = plan(0.8, TargetSpec("cpu"))
    assert on_cpu.format == "e3m2" and "--sparse-format bitmap forces it" in on_cpu.reason


def test_bad_combinations_refused_in_python(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval()
    x = (torch.randn(2, 64),)
    cases = [
        (dict(weights="fp6", sparsity=SparseConfig(0.5, format="ellpack")), "built for the bitmap format only"),
        (dict(weights="fp6-auto", sparsity=SparseConfig(0.5)), "combines with FPx weights only"),
        (dict(weights="int8", sparsity=SparseConfig(0.5)), "combines with FPx weights only"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message):
            tensorpress.compile(model, tmp_path / "m.tpk", example_inputs=x, **options)
    assert not (tmp_path / "m.tpk").exists()


def _tp(*args: str):
    return subprocess.run([sys.executable, "-m", "tensorpress", *args], capture_output=True, text=True, timeout=600)


def test_cli_fp6_sparsity_matches_onnxruntime_and_inspect_lists_it(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    from reference_models import export_onnx

    onnx_path = export_onnx("mlp", tmp_path)
    artifact = tmp_path / "mlp.tpk"
    options = ["--weights", "fp6", "--sparsity", "0.8", "--sparse-format", "bitmap"]
    result = _tp("compile", str(onnx_path), "-o", str(artifact), *options)
    assert result.returncode == 0, result.stderr
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    result = _tp("run", str(artifact), "--inputs", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz"))
    assert result.returncode == 0, result.stderr

    model = onnx.load(str(onnx_path))
    for init in model.graph.initializer:
        if init.name in ("fc1.weight", "fc2.weight"):  # [M, K]
            w = torch.from_numpy(numpy_helper.to_array(init).copy())
            init.CopyFrom(numpy_helper.from_array(pruned_and_fp6(w, 0.8).numpy(), init.name))
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["y"], want, rtol=1e-4, atol=1e-5)

    listing = _tp("inspect", str(artifact)).stdout
    for layer in tensorpress.runtime.load(artifact).manifest["layers"]:
        (line,) = [row for row in listing.splitlines() if row.strip().startswith(layer["weight"])]
        assert "bitmap-e3m2" in line and f"{layer['density']:.1%}" in line
        assert f"{1 - layer['stored_bytes'] / layer['fp16_bytes']:.1%}" in line


@pytest.mark.parametrize(
    "options, message",
    [
        (["--weights", "fp6", "--sparsity", "0.8", "--sparse-format", "ellpack"], "built for the bitmap format only"),
    ],
)
def test_cli_bad_combinations_are_one_error_line(tmp_path, options, message):
    artifact = tmp_path / "m.tpk"
    result = _tp("compile", str(tmp_path / "missing.onnx"), "-o", str(artifact), *options)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not artifact.exists()
