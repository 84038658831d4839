"""Make TVM build real CUDA binaries (fatbins) on machines with nvcc but without a GPU driver.

TVM 0.27 silently produces a module holding only CUDA *source* when libtvm_runtime_cuda.so cannot be
loaded (field guide, fact 2). That library needs libcudart.so.13 and the driver's libcuda.so.1. Where
no driver exists we compile a stub libcuda (every call fails with "no device") into a cache folder,
preload it and the CUDA runtime globally, then load TVM's CUDA runtime library, and build with
nvcc (TVM_CUDA_COMPILE_MODE=nvcc). A real driver, where present, is always preferred.

`ensure_cuda_build_support()` is idempotent and cheap after the first call; call it before any
`tvm.compile` for a CUDA target.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from tensorpress.errors import ConfigError

_STUB_SOURCE = Path(__file__).with_name("stub_libcuda.c")
# The fatbin container's magic number (little-endian 0xBA55ED50): present in a library that
# carries compiled GPU code, absent from one that carries only CUDA source.
FATBIN_MAGIC = b"\x50\xed\x55\xba"


def cuda_home() -> Path | None:
    """The CUDA toolkit folder: the first of $CUDA_HOME, $CUDA_PATH, the folder above nvcc on PATH and
    /usr/local/cuda that holds both bin/nvcc and the CUDA runtime (lib64/libcudart.so*), or None.
    (nvcc on PATH may be a wrapper script outside the toolkit, e.g. /usr/local/bin/nvcc.)"""
    candidates = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and list((home / "lib64").glob("libcudart.so*")):
            return home
    return None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tensorpress"


def _build_stub_libcuda() -> Path:
    """Compile the stub driver once per machine (atomic: build to a temp name, then rename)."""
    out_dir = _cache_dir() / "stub-libcuda"
    out = out_dir / "libcuda.so.1"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise ConfigError("building for CUDA without a GPU driver needs a C compiler (cc/gcc) on PATH.")
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so")
    os.close(fd)
    try:
        subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-Wl,-soname,libcuda.so.1", "-o", tmp, str(_STUB_SOURCE)],
            check=True,
            capture_output=True,
        )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _has_real_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1", ctypes.RTLD_GLOBAL)
        return True
    except OSError:
        return False


def _load_cudart(home: Path) -> None:
    try:
        ctypes.CDLL("libcudart.so.13", ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    for candidate in sorted((home / "lib64").glob("libcudart.so.13*")) + sorted(
        (home / "lib").glob("libcudart.so.13*")
    ):
        ctypes.CDLL(str(candidate), ctypes.RTLD_GLOBAL)
        return
    raise ConfigError(
        f"the CUDA 13 runtime (libcudart.so.13) was not found under {home}; install the CUDA 13 toolkit "
        "or set CUDA_HOME to it."
    )


@cache
def ensure_cuda_build_support() -> Path:
    """Prepare this process to compile CUDA targets with nvcc; returns the CUDA toolkit folder.

    Raises ConfigError with what to install when nvcc or the CUDA runtime is missing.
    """
    home = cuda_home()
    if home is None:
        raise ConfigError("compiling for a CUDA target needs nvcc (CUDA 13 toolkit); put it on PATH or set CUDA_HOME.")
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    os.environ["PATH"] = f"{home / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    if not _has_real_driver():
        ctypes.CDLL(str(_build_stub_libcuda()), ctypes.RTLD_GLOBAL)
    _load_cudart(home)
    _load_tvm_cuda_runtime()
    return home


def _load_tvm_cuda_runtime() -> None:
    """Load libtvm_runtime_cuda.so into a process whose `import tvm` could not load it (no driver then)."""
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
        package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
    )


def library_has_gpu_binary(library_path: str | os.PathLike) -> bool:
    """True when an exported library carries compiled GPU code (a fatbin), not just CUDA source."""
    return FATBIN_MAGIC in Path(library_path).read_bytes()


def extract_fatbins(library_path: str | os.PathLike) -> list[bytes]:
    """The fatbin containers embedded in an exported library, for cuobjdump/nvdisasm inspection.

    Fatbin header: magic u32 | version u16 | header size u16 | payload size u64, then the payload.
    """
    data = Path(library_path).read_bytes()
    found, start = [], data.find(FATBIN_MAGIC)
    while start != -1:
        header_size = int.from_bytes(data[start + 6 : start + 8], "little")
        payload_size = int.from_bytes(data[start + 8 : start + 16], "little")
        end = start + header_size + payload_size
        if 16 <= header_size <= 64 and end <= len(data):
            found.append(data[start:end])
            start = data.find(FATBIN_MAGIC, end)
        else:
            start = data.find(FATBIN_MAGIC, start + 4)
    return found
