"""TVM's runtime, without TVM's compiler: find and load libtvm_runtime*.so through tvm-ffi.

The runtime needs three things (3.4 MB + 2.5 MB + 0.5 MB): `tvm_ffi` (pip apache-tvm-ffi), TVM's
`libtvm_runtime.so` (the Relax VM, tensors, modules) and, for CUDA, `libtvm_runtime_cuda.so` with the
CUDA runtime `libcudart.so.13`. They are found, in order:
  1. in a process that already imported `tvm`: the libraries it loaded;
  2. in $TENSORPRESS_TVM_LIB_DIR (what a runtime bundle made by `tensorpress package` sets);
  3. in the installed `tvm` package's lib/ folder, located without importing `tvm` (which would load
     the 259 MB compiler library).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from tensorpress.errors import DeviceMismatchError, TensorpressError

LIB_DIR_ENV = "TENSORPRESS_TVM_LIB_DIR"
KDL_CPU, KDL_CUDA = 1, 2
POOLED_ALLOCATOR = 2


def tvm_lib_dir() -> Path:
    """The folder holding libtvm_runtime.so (see the module docstring for the search order)."""
    if os.environ.get(LIB_DIR_ENV):
        return Path(os.environ[LIB_DIR_ENV])
    spec = importlib.util.find_spec("tvm")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))) / "lib"
    raise TensorpressError(
        "TVM's runtime library was not found: install apache-tvm, or run from a bundle made by "
        f"`tensorpress package` (which sets {LIB_DIR_ENV})."
    )


def _import_tvm_ffi_without_torch() -> Any:
    """Import tvm_ffi without letting it import torch.

    tvm_ffi 0.1.14 tries `import torch` on import (a workaround for a Windows symbol clash) and, when
    torch is there, may build a DLPack helper extension. The runtime must stay free of torch (seconds of
    start-up, hundreds of MB), so during that import `import torch` fails as if torch were absent.
    Where the user already imported torch, nothing changes.
    """
    if "tvm_ffi" in sys.modules or "torch" in sys.modules:
        import tvm_ffi

        return tvm_ffi
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        import tvm_ffi
    finally:
        del sys.modules["torch"]
    return tvm_ffi


@cache
def _load_core() -> Any:
    tvm_ffi = _import_tvm_ffi_without_torch()

    if "tvm" not in sys.modules:
        ctypes.CDLL(str(tvm_lib_dir() / "libtvm_runtime.so"), ctypes.RTLD_GLOBAL)
    return tvm_ffi


@cache
def _load_cuda() -> None:
    """Load TVM's CUDA runtime (and libcudart.so.13, bundled or system) once per process."""
    _load_core()
    tvm_loaded = sys.modules.get("tvm.base")
    if tvm_loaded is not None and "tvm_runtime_cuda" in getattr(tvm_loaded, "_LOADED_LIBS", {}):
        return
    lib_dir = tvm_lib_dir()
    try:
        ctypes.CDLL("libcuda.so.1", ctypes.RTLD_GLOBAL)
    except OSError as err:
        raise DeviceMismatchError("no NVIDIA driver (libcuda.so.1) on this machine; use device='cpu'.") from err
    bundled = lib_dir / "libcudart.so.13"
    try:
        ctypes.CDLL(str(bundled) if bundled.exists() else "libcudart.so.13", ctypes.RTLD_GLOBAL)
    except OSError as err:
        raise TensorpressError(
            "the CUDA 13 runtime (libcudart.so.13) was not found; install it or use a bundle from "
            "`tensorpress package`, which carries it."
        ) from err
    ctypes.CDLL(str(lib_dir / "libtvm_runtime_cuda.so"), ctypes.RTLD_GLOBAL)


def ffi() -> Any:
    """The tvm_ffi module, with TVM's runtime library loaded."""
    return _load_core()


def get_global_func(name: str) -> Any:
    return ffi().get_global_func(name)


def device(kind: str, index: int = 0) -> Any:
    """A tvm-ffi Device; loads the CUDA runtime for kind 'cuda'."""
    if kind == "cuda":
        _load_cuda()
    return ffi().device(kind, index)


def cuda_device_info(index: int = 0) -> dict[str, Any]:
    """Name-free facts about a CUDA device: whether it exists and its compute capability."""
    _load_cuda()
    get_attr = get_global_func("runtime.GetDeviceAttr")
    exists = bool(get_attr(KDL_CUDA, index, 0))  # kExist
    if not exists:
        return {"exists": False}
    version = str(get_attr(KDL_CUDA, index, 4))  # kComputeVersion, e.g. "9.0"
    return {"exists": True, "compute_version": version}


_ATTR_TOTAL_GLOBAL_MEMORY, _ATTR_AVAILABLE_GLOBAL_MEMORY = 14, 15  # runtime.GetDeviceAttr kinds


def host_available_memory_bytes() -> int:
    """RAM the host can give without swapping: /proc/meminfo's MemAvailable (free + reclaimable
    caches), else the free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_memory_bytes(dev) -> int:
    """Free memory of `dev`: the GPU's available global memory, or the host's available RAM."""
    if dev.dlpack_device_type() == KDL_CPU:
        return host_available_memory_bytes()
    get_attr = get_global_func("runtime.GetDeviceAttr")
    return int(get_attr(dev.dlpack_device_type(), dev.index, _ATTR_AVAILABLE_GLOBAL_MEMORY))


def load_module(path: str | os.PathLike) -> Any:
    return ffi().load_module(str(path))


def empty(shape, dtype: str, dev) -> Any:
    return get_global_func("runtime.TVMTensorAllocWithScope")(tuple(int(s) for s in shape), dtype, dev, None)


# TVM's CPU kernels assume 64-byte aligned buffers (aligned vector loads); numpy only promises 16.
ALIGNMENT = 64


def aligned_copy(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of `array` whose data starts on a 64-byte boundary."""
    raw = np.empty(array.nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    out = raw[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def to_device(array: np.ndarray, dev) -> Any:
    """Copy a numpy array to a new tensor on `dev`. On the CPU a contiguous, 64-byte aligned, writable
    array is shared zero-copy; anything else is copied into an aligned buffer first. A zero-size array
    becomes an empty tensor (numpy gives it strides that are not the compact ones TVM checks)."""
    if array.size == 0:
        return empty(array.shape, str(array.dtype), dev)
    if dev.dlpack_device_type() == KDL_CPU:
        aligned = array.flags.c_contiguous and array.flags.writeable and array.ctypes.data % ALIGNMENT == 0
        return ffi().from_dlpack(array if aligned else aligned_copy(array))
    array = np.ascontiguousarray(array)
    out = empty(array.shape, str(array.dtype), dev)
    get_global_func("runtime.TVMTensorCopyFromBytes")(out, array.ctypes.data_as(ctypes.c_void_p), array.nbytes)
    return out


def to_numpy(tensor) -> np.ndarray:
    """A tensor (any device) as a numpy array owned by the caller."""
    shape = tuple(int(s) for s in tensor.shape)
    dtype = np.dtype(str(tensor.dtype))
    out = np.empty(shape, dtype)
    get_global_func("runtime.TVMTensorCopyToBytes")(tensor, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
    return out
