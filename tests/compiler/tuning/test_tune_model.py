"""`tensorpress tune` end to end on a small MLP: killed with SIGKILL mid-search and run again it resumes
(nothing lost, nothing measured twice); `compile --tuning-log` builds the recorded configs (checked in
the manifest and by `inspect`, not by timing) and computes what numpy does; bad input is one sentence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from reference_models import build, export_onnx

import tensorpress
from tensorpress.compiler.tuning.records import RECORDS_FILE, key_text

TRIALS = 6


def tp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tensorpress", *args], capture_output=True, text=True, timeout=600)


def _trial_lines(log: Path) -> list[str]:
    if not (log / RECORDS_FILE).exists():
        return []
    return [line for line in (log / RECORDS_FILE).read_text().splitlines() if '"type": "trial"' in line]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """(onnx path, log folder, the log's lines when the first run was killed, the rerun's stdout)."""
    folder = tmp_path_factory.mktemp("tune")
    onnx_path = export_onnx("mlp", folder)
    log = folder / "log"
    command = [sys.executable, "-m", "tensorpress", "tune", str(onnx_path), "--trials", str(TRIALS), "--log", str(log)]
    command += ["--generic-ops", "0"]  # templates only: meta_schedule's search has its own tests
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(_trial_lines(log)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = (log / RECORDS_FILE).read_text().splitlines()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    return onnx_path, log, before, rerun.stdout


def test_a_killed_tune_resumes_without_losing_or_remeasuring_trials(killed_and_resumed):
    _, log, before, stdout = killed_and_resumed
    lines = (log / RECORDS_FILE).read_text().splitlines()
    assert 3 <= len([x for x in before if '"trial"' in x]) < 2 * TRIALS  # killed mid-tune
    assert lines[: len(before)] == before  # every record written before the kill is kept as it was
    records = [json.loads(line) for line in lines]
    trials = [(key_text(r["key"]), key_text(r["config"])) for r in records if r["type"] == "trial"]
    assert len(trials) == len(set(trials)) == 2 * TRIALS  # two kernels, no config measured twice
    best = [r for r in records if r["type"] == "best"]
    assert len(best) == 2 and all(b["trials"] == TRIALS for b in best)
    assert "resumed" in stdout and "speedup" in stdout  # the summary table
    assert (log / "tuning_progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _numpy_mlp(x: np.ndarray) -> np.ndarray:
    params = {k: v.detach().numpy().astype(np.float64) for k, v in build("mlp").state_dict().items()}
    hidden = np.maximum(x @ params["fc1.weight"].T + params["fc1.bias"], 0)
    return hidden @ params["fc2.weight"].T + params["fc2.bias"]


def _run(artifact: Path, x: np.ndarray) -> np.ndarray:
    (y,) = tensorpress.runtime.load(artifact, device="cpu").run({"x": x})
    return y


def test_compile_applies_the_recorded_configs_and_computes_the_same(killed_and_resumed, tmp_path):
    onnx_path, log, _, _ = killed_and_resumed
    best = {key_text(r["key"]): r for r in map(json.loads, (log / RECORDS_FILE).read_text().splitlines())}
    best = {k: r for k, r in best.items() if r["type"] == "best"}
    # a hand-made log whose record for one kernel is a config the default never is (3 x 8 tiles)
    chosen = next(iter(best.values()))
    own = tmp_path / "own"
    own.mkdir()
    (own / RECORDS_FILE).write_text(
        json.dumps({**chosen, "config": {"schedule": "panel", "token_tile": 3, "weight_tile": 8}}) + "\n"
    )
    untuned = tensorpress.compile(onnx_path, tmp_path / "untuned.tpk").manifest["kernel_configs"]
    tuned = tensorpress.compile(onnx_path, tmp_path / "tuned.tpk", tuning_log=log).manifest["kernel_configs"]
    mine = tensorpress.compile(onnx_path, tmp_path / "own.tpk", tuning_log=own).manifest["kernel_configs"]
    assert len(untuned) == 2 and {c["origin"] for c in untuned.values()} == {"default"}
    assert {c["origin"] for c in tuned.values()} == {str((log / RECORDS_FILE).resolve())}
    assert sorted(key_text(c["config"]) for c in tuned.values()) == sorted(key_text(r["config"]) for r in best.values())
    own_kernel = [name for name, c in mine.items() if c["origin"] != "default"]
    assert len(own_kernel) == 1 and mine[own_kernel[0]]["config"] == {
        "schedule": "panel",
        "token_tile": 3,
        "weight_tile": 8,
    }
    x = np.random.default_rng(0).standard_normal((37, 64)).astype(np.float32)
    reference = _numpy_mlp(x.astype(np.float64))
    for name in ("untuned", "tuned", "own"):
        np.testing.assert_allclose(_run(tmp_path / f"{name}.tpk", x), reference, rtol=1e-4, atol=1e-4, err_msg=name)
    shown = tp("inspect", str(tmp_path / "own.tpk"))
    assert "kernel configs (2 template kernels, 1 from tuning logs)" in shown.stdout
    assert "token_tile=3, weight_tile=8  (tuned: " in shown.stdout


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_error_line(capsys, *args: str) -> str:
    """The CLI (in this process: no interpreter start-up per case) fails with one `error: ...` sentence."""
    from tensorpress.cli import main

    assert main(list(args)) == 1
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert errors[0].endswith("."), errors[0]
    return errors[0]


def test_bad_input_is_one_sentence_and_writes_nothing(killed_and_resumed, tmp_path, capsys):
    onnx_path = str(killed_and_resumed[0])
    log = tmp_path / "log"
    assert "no-such-model.onnx" in _one_error_line(
        capsys, "tune", str(tmp_path / "no-such-model.onnx"), "--log", str(log)
    )
    assert "10x" in _one_error_line(capsys, "tune", onnx_path, "--time-budget", "10x", "--log", str(log))
    assert "trials" in _one_error_line(capsys, "tune", onnx_path, "--trials", "0", "--log", str(log))
    assert "go together" in _one_error_line(
        capsys, "tune", onnx_path, "--rpc-tracker", "127.0.0.1:9", "--log", str(log)
    )
    unreachable = _one_error_line(
        capsys, "tune", onnx_path, "--rpc-tracker", f"127.0.0.1:{_closed_port()}", "--rpc-key", "gpu", "--log", str(log)
    )
    assert "rpc_tracker" in unreachable and "gpu" in unreachable, unreachable
    assert not log.exists()
    output = tmp_path / "m.tpk"
    missing = _one_error_line(capsys, "compile", onnx_path, "-o", str(output), "--tuning-log", str(log))
    assert "tuning log folder" in missing and not output.exists()


@pytest.mark.slow
def test_tune_searches_the_generic_ops_and_compile_applies_the_faster_ones(tmp_path):
    from tensorpress.compiler.tuning.generic_records import finished_ops, slower_than_default

    onnx_path = export_onnx("block", tmp_path)
    log = tmp_path / "log"
    shape = ["--input-shape", "x=2,16,64"]  # generic ops are tuned for static shapes only
    tuned = tp("tune", str(onnx_path), *shape, "--trials", "4", "--generic-ops", "1", "--log", str(log))
    assert tuned.returncode == 0, tuned.stderr
    assert "generic op" in tuned.stdout and "speedup" in tuned.stdout, tuned.stdout
    (entry,) = finished_ops(log).values()
    artifact = tmp_path / "block.tpk"
    compiled = tp("compile", str(onnx_path), *shape, "-o", str(artifact), "--tuning-log", str(log))
    assert compiled.returncode == 0, compiled.stderr
    applied = tensorpress.runtime.load(artifact).manifest["tuned_generic_kernels"]
    assert len(applied) == (0 if slower_than_default(entry) else 1)
    assert all(name in tp("inspect", str(artifact)).stdout for name in applied)
    x = np.random.default_rng(0).standard_normal((2, 16, 64)).astype(np.float32)
    import torch

    with torch.no_grad():
        want = build("block")(torch.from_numpy(x)).numpy()
    (got,) = tensorpress.runtime.load(artifact).run([x])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
