"""Calibrated compression through the whole compiler on the CPU: --prune wanda / sparsegpt and FPx's
--scale-search act, from Python and the command line. The compiled model computes what torch (or
onnxruntime) computes with the same weights, those weights derived from torch's own forward hooks
on the calibration inputs (not from the compiler's calibration run), layer after layer: fc2's
statistics are taken with fc1 already compressed as stored, as the compiler does level by level."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import tensorpress
from tensorpress import SparseConfig
from tensorpress.compiler.formats import fpx_codes as fpx
from tensorpress.compiler.formats import get_weight_format
from tensorpress.compiler.pruning import prune

# four samples of [5, 64], four input channels 8x larger than the rest (outliers Wanda's norms see)
SAMPLES = (np.random.default_rng(0).standard_normal((4, 5, 64)) * np.r_[[8.0] * 4, [1.0] * 60]).astype(np.float32)


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval()


def hook_grams(model: torch.nn.Module, samples: np.ndarray, layers=(0, 2)) -> dict:
    """{index (or name) of each nn.Linear of `layers`: X^T X over every calibration token}, by forward hooks."""
    grams: dict = {}

    def hook(index):
        def record(module, args, out):
            x = args[0].detach().double().reshape(-1, module.in_features).numpy()
            grams[index] = grams.get(index, 0) + x.T @ x

        return record

    handles = [(model[i] if isinstance(i, int) else getattr(model, i)).register_forward_hook(hook(i)) for i in layers]
    with torch.no_grad():
        for x in samples:
            model(torch.from_numpy(x))
    for handle in handles:
        handle.remove()
    return grams


class GramStats:
    def __init__(self, gram):
        self.gram = gram
        self.channel_norms = np.sqrt(np.diag(gram))


def torch_wanda(w: torch.Tensor, norms: np.ndarray, sparsity: float) -> torch.Tensor:
    keep = w.shape[1] - int(np.floor(sparsity * w.shape[1]))
    score = w.abs() * torch.from_numpy(norms).float()[None, :]
    mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, torch.topk(score, keep, dim=1).indices, True)
    return torch.where(mask, w, torch.zeros_like(w))


def as_stored(w: torch.Tensor) -> torch.Tensor:
    return w.to(torch.float16).to(torch.float32)  # bitmap keeps each nonzero in fp16


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "sparsegpt-sweep"])
def test_mlp_pruned_with_calibration_matches_torch_with_the_same_weights(tmp_path, method):
    model = mlp()
    np.savez(tmp_path / "calib.npz", input=SAMPLES)
    x = torch.randn(5, 64)
    report = tensorpress.compile(
        model, tmp_path / "m.tpk", example_inputs=(x,), sparsity=SparseConfig(0.5, prune=method),
        calibration=tmp_path / "calib.npz",
    )  # fmt: skip
    assert report.manifest["recipe"]["calibration"] == {"file": "calib.npz", "samples": 4}
    assert {layer["stored_format"] for layer in report.manifest["layers"]} == {"ellpack"}  # auto, on the CPU
    (y,) = tensorpress.runtime.load(report.artifact).run([x.numpy()])
    with torch.no_grad():
        for i in (0, 2):  # fc1, then fc2 on the inputs fc1 as stored gives it
            gram = hook_grams(model, SAMPLES, layers=(i,))[i]
            w = model[i].weight
            if method == "wanda":
                pruned = torch_wanda(w, np.sqrt(np.diag(gram)), 0.5)
            else:
                pruned = torch.from_numpy(prune(w.numpy(), 0.5, method, GramStats(gram)))
            assert ((pruned == 0).sum(1) == w.shape[1] // 2).all()
            w.copy_(as_stored(pruned))
        want = model(x).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_act_scale_search_picks_each_rows_clip_with_the_lowest_output_error():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 48)) * np.r_[[10.0] * 3, [1.0] * 45]
    w = rng.standard_normal((16, 48)).astype(np.float32)
    gram = x.T @ x
    codes, scales = fpx.encode_act(w, gram, 3, 2)
    # brute force in torch: every clip ratio, the output error of each row on the tokens themselves
    errors = []
    for clip in fpx.MSE_CLIP_RATIOS:
        s = fpx.absmax_scales(w, 3, 2, clip)
        w_hat = torch.from_numpy(fpx.decode(fpx.quantize(w, s, 3, 2), s, 3, 2)).double()
        errors.append(((torch.from_numpy(w).double() - w_hat) @ torch.from_numpy(x).T).square().sum(1).numpy())
    errors = np.array(errors)  # [ratios, rows]
    best = errors.min(0)
    chosen = [max(r for r, e in zip(fpx.MSE_CLIP_RATIOS, errors[:, row]) if e == best[row]) for row in range(16)]
    np.testing.assert_array_equal(
        scales, [fpx.absmax_scales(w[row : row + 1], 3, 2, c)[0] for row, c in enumerate(chosen)]
    )
    np.testing.assert_allclose(fpx.output_error(w, codes, scales, 3, 2, gram), best, rtol=1e-9)
    mse_error = fpx.output_error(w, *fpx.encode_mse(w, 3, 2), 3, 2, gram)
    assert (fpx.output_error(w, codes, scales, 3, 2, gram) <= mse_error * (1 + 1e-12)).all()
    assert fpx.output_error(w, codes, scales, 3, 2, gram).sum() < mse_error.sum()


def test_mlp_fp6_act_matches_torch_with_the_same_weights(tmp_path):
    model = mlp()
    np.savez(tmp_path / "calib.npz", input=SAMPLES)
    x = torch.randn(5, 64)
    report = tensorpress.compile(
        model, tmp_path / "m.tpk", example_inputs=(x,), weights="fp6", scale_search="act",
        calibration=tmp_path / "calib.npz",
    )  # fmt: skip
    assert report.manifest["recipe"]["scale_search"] == "act"
    (y,) = tensorpress.runtime.load(report.artifact).run([x.numpy()])
    fmt = get_weight_format("fp6", "act")
    with torch.no_grad():
        for i in (0, 2):
            gram = hook_grams(model, SAMPLES, layers=(i,))[i]
            w = model[i].weight
            w.copy_(torch.from_numpy(fmt.unpack(fmt.pack_calibrated(w.numpy(), gram))))
        want = model(x).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def _tp(*args: str):
    return subprocess.run([sys.executable, "-m", "tensorpress", *args], capture_output=True, text=True, timeout=600)


def test_cli_wanda_matches_onnxruntime_on_the_pruned_weights_and_act_without_calibration_is_refused(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    from reference_models import build, export_onnx

    onnx_path = export_onnx("mlp", tmp_path)  # fc1 [128, 64], fc2 [32, 128] as Gemm(transB=1)
    np.savez(tmp_path / "calib.npz", x=SAMPLES)
    artifact = tmp_path / "mlp_wanda.tpk"
    result = _tp("compile", str(onnx_path), "-o", str(artifact), "--sparsity", "0.5", "--prune", "wanda",
                 "--calibration", str(tmp_path / "calib.npz"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    (y,) = tensorpress.runtime.load(artifact).run([x])

    model = onnx.load(str(onnx_path))
    inits = {init.name: init for init in model.graph.initializer}
    torch_mlp = build("mlp")  # the exported module
    for name in ("fc1", "fc2"):
        gram = hook_grams(torch_mlp, SAMPLES, layers=(name,))[name]
        layer = getattr(torch_mlp, name)
        pruned = as_stored(torch_wanda(layer.weight.detach(), np.sqrt(np.diag(gram)), 0.5))
        layer.weight.data = pruned
        inits[f"{name}.weight"].CopyFrom(numpy_helper.from_array(pruned.numpy(), f"{name}.weight"))
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)

    result = _tp(
        "compile", str(onnx_path), "-o", str(tmp_path / "act.tpk"), "--weights", "fp6", "--scale-search", "act"
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "act scale search needs calibration data" in lines[0], (
        result.stderr
    )
    assert not (tmp_path / "act.tpk").exists()
