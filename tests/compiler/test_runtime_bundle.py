"""`tensorpress package`: the bundle runs in a fresh virtual environment that has numpy and nothing else;
a killed `package` leaves no bundle, and its staging folder goes at the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from reference_models import export_onnx

import tensorpress
from tensorpress.compiler.runtime_bundle import STAGING_PREFIX, make_runtime_bundle
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
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"file is a file, not a folder; choose another bundle folder\.$"):
        make_runtime_bundle(artifact, tmp_path / "file" / "bundle")
    unwritable = Path("/sys")  # sysfs takes no new files, even from root (who ignores file modes)
    if os.geteuid() != 0:
        unwritable = tmp_path / "taken"
        unwritable.chmod(0o555)
    with pytest.raises(ConfigError, match=r"is not writable \(permission denied\); choose another bundle folder\.$"):
        make_runtime_bundle(artifact, unwritable / "bundle")


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


# `tensorpress package` stopped once the runtime files are staged (the parent then SIGKILLs it).
PACKAGE_STOPPED_WHILE_STAGING = """
import sys, time
from tensorpress.compiler import runtime_bundle
write = runtime_bundle.write_runtime_files
def write_then_wait(dest, *args, **kwargs):
    write(dest, *args, **kwargs)
    print("staged", dest, flush=True)
    time.sleep(120)
runtime_bundle.write_runtime_files = write_then_wait
from tensorpress.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_package_leaves_no_bundle_and_the_next_run_removes_its_staging(tmp_path):
    artifact = tensorpress.compile(export_onnx("mlp", tmp_path), tmp_path / "mlp.tpk").artifact
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", PACKAGE_STOPPED_WHILE_STAGING, "package", str(artifact), "-o", str(out / "bundle")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()  # blocks until the runtime files are staged
        assert line[:1] == ["staged"], proc.communicate()[1]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (staging,) = out.iterdir()  # the kill skipped every clean-up: the staging folder, and no bundle
    assert str(staging) == line[1] and staging.name.startswith(f"{STAGING_PREFIX}{proc.pid}-")
    assert sum(f.stat().st_size for f in staging.rglob("*") if f.is_file()) > 1e6
    bundle = make_runtime_bundle(artifact, out / "bundle")
    assert [p.name for p in out.iterdir()] == ["bundle"]
    assert (bundle.folder / "run.py").is_file() and not list(bundle.folder.glob(".in-use"))


def test_a_live_package_keeps_its_staging_folder(tmp_path):
    """Another `package` in the same folder, still running (its pid alive, its lock held), is left alone."""
    artifact = tensorpress.compile(export_onnx("mlp", tmp_path), tmp_path / "mlp.tpk").artifact
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", PACKAGE_STOPPED_WHILE_STAGING, "package", str(artifact), "-o", str(out / "first")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[:1] == ["staged"], proc.communicate()[1]
        make_runtime_bundle(artifact, out / "second")
        assert sorted(p.name for p in out.iterdir()) == sorted(["second", Path(line[1]).name])
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
