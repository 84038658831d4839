"""Where a CUDA device is visible, GPU tests without their kit fail loudly instead of skipping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gpu_kit
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _no_tvm() -> list[str]:
    raise ImportError("No module named 'tvm'")


@pytest.fixture
def cuda_visible(monkeypatch):
    monkeypatch.setattr(gpu_kit, "MANIFEST", None)
    monkeypatch.setattr(gpu_kit, "cuda_device_visible", lambda: True)


def test_without_a_kit_or_tvm_the_case_list_fails_where_cuda_is_visible(cuda_visible):
    with pytest.raises(pytest.fail.Exception, match="a CUDA device is visible but there is no GPU kit"):
        gpu_kit.require_cases("tests", _no_tvm)
    with pytest.raises(pytest.fail.Exception, match="lists no 'tests' cases"):
        gpu_kit.require_cases("tests", lambda: [])
    assert gpu_kit.require_cases("tests", lambda: ["a", "b"]) == ["a", "b"]


def test_without_a_kit_or_tvm_nothing_is_collected_where_no_cuda_is_visible(monkeypatch):
    monkeypatch.setattr(gpu_kit, "MANIFEST", None)
    monkeypatch.setattr(gpu_kit, "cuda_device_visible", lambda: False)
    assert gpu_kit.require_cases("tests", _no_tvm) == []


def test_a_kit_without_the_section_fails_where_cuda_is_visible(cuda_visible, monkeypatch):
    monkeypatch.setattr(gpu_kit, "MANIFEST", {"tests": {"cases": ["x"]}})
    assert gpu_kit.require_cases("tests", _no_tvm) == ["x"]
    with pytest.raises(pytest.fail.Exception, match="has no 'fpx_tests' cases"):
        gpu_kit.require_cases("fpx_tests", _no_tvm)


def test_the_kv_attention_gpu_tests_fail_without_a_kit_where_cuda_is_visible(tmp_path):
    fake = tmp_path / "bin" / "nvidia-smi"  # a visible "GPU" for the collection's check
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: Fake (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TENSORPRESS_GPU_KIT"}
    env["PATH"] = f"{fake.parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q", "--collect-only",
         "tests/schedules/test_kv_attention_gpu.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0, done.stdout[-2000:]
    assert "a CUDA device is visible but TENSORPRESS_GPU_KIT names no prepared GPU kit" in done.stdout
