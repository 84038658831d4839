"""Compile targets as users name them (`cpu`, `cpu:x86-64-v4`, `cuda:sm_XX`: TARGET_CHOICES) and as TVM needs them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tensorpress.errors import ConfigError

# The x86-64 levels a CPU artifact can be built for, with the /proc/cpuinfo flags a CPU needs to run it.
# x86-64-v3 (AVX2 + FMA + F16C, every x86 server since 2015) is the portable default; x86-64-v4 adds
# AVX-512 (32 vector registers: larger GEMM register tiles), what onnxruntime's MLAS picks at run time
# on such a CPU.
CPU_LEVELS = {
    "x86-64-v3": ("avx2", "fma", "f16c"),
    "x86-64-v4": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}
CPU_MCPU = "x86-64-v3"
CUDA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a")
# Every name `parse_target` takes (and `llvm` for cpu); the CLI's --target help and the errors list these.
# `cpu:native` is the highest level of CPU_LEVELS that this machine runs.
TARGET_CHOICES = (
    "cpu",
    *(f"cpu:{level}" for level in CPU_LEVELS),
    "cpu:native",
    "cuda",
    *(f"cuda:{arch}" for arch in CUDA_ARCHS),
)


@dataclass(frozen=True)
class TargetSpec:
    """What an artifact is built for: kind "cpu" or "cuda"; arch: the GPU architecture for cuda, the x86-64
    level for cpu (None: the default, CPU_MCPU)."""

    kind: str
    arch: str | None = None

    @property
    def name(self) -> str:
        return self.kind if self.arch is None else f"{self.kind}:{self.arch}"

    @property
    def mcpu(self) -> str:
        """The x86-64 level of the CPU code: a cpu target's own, the default for a cuda target's host code."""
        return self.arch if self.kind == "cpu" and self.arch is not None else CPU_MCPU

    @property
    def cpu_flags(self) -> tuple[str, ...]:
        """The CPU flags the artifact's CPU code needs (the runtime refuses a CPU without them)."""
        return CPU_LEVELS[self.mcpu]

    @property
    def default_dtype(self) -> str:
        return "float16" if self.kind == "cuda" else "float32"

    def tvm_target(self, num_cores: int | None = None):
        """The TVM Target (JSON-dict form; the CLI string form is gone in TVM 0.27)."""
        import tvm

        if self.kind == "cuda":
            return tvm.target.Target({"kind": "cuda", "arch": self.arch}, host=_llvm_host())
        return _llvm_host(num_cores, self.mcpu)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "arch": self.arch}


def _llvm_host(num_cores: int | None = None, mcpu: str = CPU_MCPU):
    import os

    import tvm

    config = {"kind": "llvm", "mcpu": mcpu, "num-cores": num_cores or os.cpu_count() or 1}
    return tvm.target.Target(config)


def parse_target(text: str) -> TargetSpec:
    """`cpu` (x86-64-v3), `cpu:x86-64-vN` (one of CPU_LEVELS), `cpu:native` (the highest level this machine
    runs), `cuda` (the visible GPU's arch, else sm_80), or `cuda:sm_XX` (one of CUDA_ARCHS)."""
    text = text.strip().lower()
    if text in ("cpu", "llvm"):
        return TargetSpec("cpu")
    if text.startswith("cpu:"):
        level = text[4:]
        if level == "native":
            level = native_cpu_level()
        if level not in CPU_LEVELS:
            raise ConfigError(f"unknown target {text!r}; use one of {', '.join(TARGET_CHOICES)}.")
        return TargetSpec("cpu", None if level == CPU_MCPU else level)
    match = re.fullmatch(r"cuda(?::(sm_\d+a?))?", text)
    if not match:
        raise ConfigError(f"unknown target {text!r}; use one of {', '.join(TARGET_CHOICES)}.")
    arch = match.group(1) or visible_gpu_arch() or "sm_80"
    if arch not in CUDA_ARCHS:
        raise ConfigError(f"unsupported CUDA architecture {arch!r}; use one of {', '.join(CUDA_ARCHS)}.")
    return TargetSpec("cuda", arch)


def native_cpu_level() -> str:
    """The highest x86-64 level of CPU_LEVELS whose flags this machine's CPU has (the default if none)."""
    from tensorpress.runtime.host_cpu import host_cpu_flags

    have = host_cpu_flags()
    runnable = [level for level, flags in CPU_LEVELS.items() if set(flags) <= have]
    return runnable[-1] if runnable else CPU_MCPU


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
