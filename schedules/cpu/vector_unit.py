"""What a CPU target's vector unit offers a schedule: register width and register count.

Read from the LLVM target's features, not from the build machine, so an artifact built for
x86-64-v3 (AVX2) is scheduled for AVX2 even on an AVX-512 host. (`llvm_get_vector_width` is not
used: in TVM 0.27 it reports 512 bits for every x86 target.)
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.runtime import DataType
from tvm.target import Target
from tvm.target.codegen import llvm_cpu_has_features


@dataclass(frozen=True)
class VectorUnit:
    """bits: width of one vector register; registers: architectural vector registers."""

    bits: int
    registers: int

    def lanes(self, dtype: str = "float32") -> int:
        """Elements of `dtype` in one vector register (8 float32 with AVX2; bool counts as a byte)."""
        return max(self.bits // max(DataType(dtype).bits, 8), 1)


def vector_unit(target: Target) -> VectorUnit:
    """The vector unit of an llvm target: AVX-512 (512 bits, 32 registers), AVX/AVX2 (256, 16),
    NEON (128, 32), else SSE-class (128, 16)."""
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple.startswith(("aarch64", "arm64")):
        return VectorUnit(128, 32)
    if _has(target, "avx512f"):
        return VectorUnit(512, 32)
    if _has(target, "avx"):
        return VectorUnit(256, 16)
    return VectorUnit(128, 16)


def _has(target: Target, feature: str) -> bool:
    try:
        return bool(llvm_cpu_has_features(feature, target))
    except Exception:  # a target LLVM cannot describe (no mcpu/mtriple it knows): assume the baseline
        return False
