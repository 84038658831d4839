"""Compile targets as users name them (`cpu`, `cuda`, `cuda:sm_XX`, see TARGET_CHOICES) and as TVM needs them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tensorpress.errors import ConfigError

# The CPU baseline artifacts are built for: x86-64-v3 = AVX2 + FMA + F16C (every x86 server since 2015).
CPU_MCPU = "x86-64-v3"
CPU_REQUIRED_FLAGS = ("avx2", "fma", "f16c")
CUDA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a")
# Every name `parse_target` takes (and `llvm` for cpu); the CLI's --target help and the errors list these.
TARGET_CHOICES = ("cpu", "cuda", *(f"cuda:{arch}" for arch in CUDA_ARCHS))


@dataclass(frozen=True)
class TargetSpec:
    """What an artifact is built for: kind "cpu" or "cuda", and the GPU architecture for cuda."""

    kind: str
    arch: str | None = None

    @property
    def name(self) -> str:
        return self.kind if self.arch is None else f"{self.kind}:{self.arch}"

    @property
    def default_dtype(self) -> str:
        return "float16" if self.kind == "cuda" else "float32"

    def tvm_target(self, num_cores: int | None = None):
        """The TVM Target (JSON-dict form; the CLI string form is gone in TVM 0.27)."""
        import tvm

        if self.kind == "cuda":
            return tvm.target.Target({"kind": "cuda", "arch": self.arch}, host=_llvm_host())
        return _llvm_host(num_cores)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "arch": self.arch}


def _llvm_host(num_cores: int | None = None):
    import os

    import tvm

    config = {"kind": "llvm", "mcpu": CPU_MCPU, "num-cores": num_cores or os.cpu_count() or 1}
    return tvm.target.Target(config)


def parse_target(text: str) -> TargetSpec:
    """`cpu`, `cuda` (the visible GPU's arch, else sm_80), or `cuda:sm_XX` (one of CUDA_ARCHS)."""
    text = text.strip().lower()
    if text in ("cpu", "llvm"):
        return TargetSpec("cpu")
    match = re.fullmatch(r"cuda(?::(sm_\d+a?))?", text)
    if not match:
        raise ConfigError(f"unknown target {text!r}; use one of {', '.join(TARGET_CHOICES)}.")
    arch = match.group(1) or visible_gpu_arch() or "sm_80"
    if arch not in CUDA_ARCHS:
        raise ConfigError(f"unsupported CUDA architecture {arch!r}; use one of {', '.join(CUDA_ARCHS)}.")
    return TargetSpec("cuda", arch)


def visible_gpu_arch() -> str | None:
    """The first visible NVIDIA GPU's architecture as `sm_XX` (sm_90a for Hopper), or None."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.split()
    except (subprocess.SubprocessError, OSError):
        return None
    if not out:
        return None
    arch = "sm_" + out[0].replace(".", "")
    return "sm_90a" if arch == "sm_90" else arch
