"""Load the kit's kernel libraries with TVM's runtime only (tvm-ffi + libtvm_runtime*.so) and call
them on torch tensors. Runs where TVM's compiler is absent (the GPU machine) and in the dry run.

    kit = KernelKit(".device-kit")
    y = kit.run(kit.case("wg_dense_fp16_4096x4096_n16m128k64w4s4sk1"), x, [w])   # x: [N, K], w: [M, K]

TVM's runtime libraries are found and loaded by `tensorpress.runtime.tvm_runtime` (the kit carries
the runtime-only `tensorpress` package and points TENSORPRESS_TVM_LIB_DIR at its libraries).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from benchmarks.kit.cases import KernelCase

MANIFEST = "manifest.json"


class KernelKit:
    """The kernels of a prepared kit folder (see prepare.py for its layout)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        self.cases = {name: KernelCase.from_json(c) for name, c in self.manifest["kernels"].items()}
        self.device_kind = "cpu" if self.manifest["dry"] else "cuda"

    def case(self, name: str) -> KernelCase:
        return self.cases[name]

    def function(self, case: KernelCase):
        """The kernel as a callable taking tvm-ffi tensors (X, stored..., [bias], Y)."""
        library = self.manifest["kernel_library"][case.name]
        return _load_module(str(self.folder / library), self.device_kind)[case.name]

    def run(self, case: KernelCase, x, stored: list, bias=None, out=None):
        """Y [N, M] = X [N, K] · W[M, K]ᵀ (+ bias) with the case's kernel; torch tensors in and out.

        `stored` are the format's arrays (dense: [W]). Tensors must be contiguous (and, on the CPU,
        64-byte aligned, which torch's allocator gives fresh tensors)."""
        import torch

        if out is None:
            out = torch.empty((x.shape[0], case.m), dtype=x.dtype, device=x.device)
        args = [x, *stored, *([bias] if case.bias else []), out]
        ffi = _runtime(self.device_kind)
        self.function(case)(*[ffi.from_dlpack(a) for a in args])
        return out


@cache
def _runtime(device_kind: str) -> Any:
    """tvm_ffi with TVM's runtime library (and, for CUDA, its CUDA runtime) loaded."""
    from tensorpress.runtime import tvm_runtime

    if device_kind == "cuda":
        tvm_runtime.device("cuda")
    return tvm_runtime.ffi()


@cache
def _load_module(path: str, device_kind: str):
    # CUDA libraries need TVM's CUDA runtime loaded first (it registers the fatbin loader).
    return _runtime(device_kind).load_module(path)
