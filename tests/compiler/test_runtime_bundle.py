"""`tensorpress package`: the bundle runs in a fresh virtual environment that has numpy and nothing else."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from reference_models import export_onnx

import tensorpress
from tensorpress.compiler.runtime_bundle import make_runtime_bundle
from tensorpress.errors import ConfigError


@pytest.fixture(scope="module")
def numpy_only_python(tmp_path_factory) -> str:
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "numpy"], check=True, capture_output=True)
    probe = subprocess.run([python, "-c", "import tvm"], capture_output=True)
    assert probe.returncode != 0, "the fresh venv must not have TVM"
    return python


def test_bundle_runs_without_tvm(numpy_only_python, tmp_path):
    onnx_path = export_onnx("block", tmp_path, dynamic_batch=True)
    artifact = tensorpress.compile(onnx_path, tmp_path / "block.tpk").artifact
    bundle = make_runtime_bundle(artifact, tmp_path / "bundle")
    assert bundle.bytes < 40e6
    assert not list((bundle.folder / "python").glob("tensorpress/compiler"))
    x = np.random.default_rng(0).standard_normal((3, 16, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    result = subprocess.run(
        [numpy_only_python, str(bundle.folder / "run.py"), "--inputs", str(tmp_path / "in.npz"),
         "--output", str(tmp_path / "out.npz")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "out.npz") as out:
        want = ort.InferenceSession(str(onnx_path)).run(None, {"x": x})[0]
        np.testing.assert_allclose(out["y"], want, rtol=1e-4, atol=1e-4)


def test_bundle_refuses_an_existing_folder(tmp_path):
    onnx_path = export_onnx("mlp", tmp_path)
    artifact = tensorpress.compile(onnx_path, tmp_path / "mlp.tpk").artifact
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        make_runtime_bundle(artifact, tmp_path / "taken")


def test_decoder_bundle_generates_text_without_tvm(numpy_only_python, tmp_path):
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "examples" / "tiny_llama"
    artifact = tensorpress.compile(folder, tmp_path / "tiny.tpk", weights="fp6").artifact
    bundle = make_runtime_bundle(artifact, tmp_path / "bundle")
    assert bundle.bytes < 40e6
    prompt = "Return a new list containing"
    result = subprocess.run(
        [numpy_only_python, str(bundle.folder / "run.py"), "generate", "--prompt", prompt, "--max-new-tokens", "12"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    ids_line, *text = result.stdout.splitlines()
    want = tensorpress.runtime.load(artifact).generate(prompt, max_new_tokens=12)
    assert [int(t) for t in ids_line.split(",")] == want
    assert "".join(text).strip()
