"""Compile a module of scheduled Tensor Core kernels into one shared library: fatbins for a CUDA arch,
or the CPU replay of the same schedules (emulated intrinsics, built for llvm) when no arch is given.

The GPU kit (benchmarks/kit/build.py) and the CUDA tuning kit (compiler/tuning/tuning_kit.py) both build
their kernel libraries here, so what a device times is built one way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def compile_kernel_library(mod: Any, out: Path, arch: str | None) -> float:
    """Export `mod` (an IRModule of scheduled PrimFuncs, one per entry) as the library `out`: CUDA
    fatbins for `arch` (nvcc through the stub-driver toolchain), or with arch None the CPU replay (the
    module must then be scheduled with the emulated intrinsics). Returns the seconds it took."""
    import tvm

    start = time.perf_counter()
    if arch is None:
        from tensorpress.schedules.verification.cpu_replay import build_replay

        build_replay(mod, seed=None).export_library(str(out))
        return time.perf_counter() - start
    from tensorpress.compiler.cuda.toolchain import ensure_cuda_build_support, library_has_gpu_binary
    from tensorpress.schedules.verification.cuda_inspection import ASYNC_COPY_CONFIG, cuda_target

    ensure_cuda_build_support()
    target = cuda_target(arch)
    with target, tvm.transform.PassContext(opt_level=3, config=ASYNC_COPY_CONFIG):
        executable = tvm.compile(mod, target=target)
    executable.export_library(str(out))
    if not library_has_gpu_binary(out):
        raise RuntimeError(f"{out} holds no GPU binary (CUDA source only): the nvcc toolchain is not in use")
    return time.perf_counter() - start
