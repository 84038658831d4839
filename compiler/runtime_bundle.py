"""`tensorpress package`: a folder that runs an artifact where neither TVM nor tensorpress is installed.

    bundle/
    ├── run.py              entry point: python3 run.py --inputs in.npz --output out.npz [--device cuda]
    │                       (decoders: python3 run.py generate --prompt-ids 1,2,3)
    ├── model.tpk           the artifact
    ├── tvm_libs/           libtvm_runtime.so (+ libtvm_runtime_cuda.so, libcudart.so.13 for CUDA)
    ├── python/tensorpress/ __init__, errors, runtime/ (nothing of the compiler)
    ├── python/tvm_ffi/     tvm-ffi built for the target machine's Python (downloaded when it differs)
├── python/typing_extensions.py   tvm-ffi's only dependency
├── python/tokenizers/  for decoders with a tokenizer: text prompts
    └── README.txt
The target machine needs Python and numpy (and the NVIDIA driver for CUDA artifacts).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tensorpress.compiler.build_folder import LOCK_FILE, owned_folder
from tensorpress.errors import ConfigError, TensorpressError
from tensorpress.runtime.artifact import EXTRA_FILES_DIR, open_artifact
from tensorpress.runtime.atomic_file import check_destination

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding compiler/, runtime/, tensorpress/
# Build-time parts of tvm_ffi (headers, sources, the C++ JIT helpers) that a runtime never loads.
TVM_FFI_SKIP = {"include", "src", "3rdparty", "cython", "cmake", "share", "__pycache__", "stub"}
# The bundle is staged beside its destination (one rename puts it in place) in a folder named after the
# packaging process: a killed `package` leaves it, and the next one removes it (see build_folder.py).
STAGING_PREFIX = ".tensorpress-package-"

RUN_SCRIPT = '''#!/usr/bin/env python3
"""Run the bundled artifact with the bundled runtime (no TVM install needed).

    python3 run.py --inputs in.npz --output out.npz [--device cuda]     graph models
    python3 run.py generate --prompt-ids 1,2,3 [--device cuda]          decoder models
    python3 run.py inspect
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "python"))
os.environ.setdefault("TENSORPRESS_TVM_LIB_DIR", os.path.join(HERE, "tvm_libs"))

from tensorpress.cli import main  # noqa: E402

ARTIFACT = os.path.join(HERE, "model.tpk")
argv = sys.argv[1:]
if argv[:1] in (["generate"], ["inspect"]):
    argv = [argv[0], ARTIFACT, *argv[1:]]
elif argv[:1] == ["--help"] or argv[:1] == ["-h"]:
    print(__doc__)
    sys.exit(0)
else:
    argv = ["run", ARTIFACT, *argv]
sys.exit(main(argv))
'''


@dataclass
class RuntimeBundle:
    folder: Path
    bytes: int


def make_runtime_bundle(
    artifact: str | os.PathLike, output: str | os.PathLike, python_version: str | None = None
) -> RuntimeBundle:
    """Write the bundle folder for `artifact`. Built in a staging folder beside it and renamed into place:
    `output` appears whole or not at all, and a killed run's staging folder goes at the next run."""
    opened = open_artifact(artifact)
    output = Path(output)
    if output.exists():
        raise ConfigError(f"{output} already exists; choose a new folder for the bundle.")
    check_destination(output, "bundle folder")
    cuda = opened.manifest["target"]["kind"] == "cuda"
    python_version = python_version or _this_python()
    output.parent.mkdir(parents=True, exist_ok=True)
    with owned_folder(output.parent, STAGING_PREFIX) as staging:
        shutil.copyfile(artifact, staging / "model.tpk")
        has_tokenizer = any(part.startswith(EXTRA_FILES_DIR + "tokenizer") for part in opened.manifest["parts"])
        write_runtime_files(staging, cuda, python_version, with_tokenizer=has_tokenizer)
        (staging / "run.py").write_text(RUN_SCRIPT)
        (staging / "README.txt").write_text(
            f"tensorpress runtime bundle for {Path(artifact).name} ({opened.manifest['target']['kind']}, "
            f"Python {python_version}).\nNeeds: python{python_version} and numpy"
            + (", and an NVIDIA driver for CUDA 13." if cuda else ".")
            + "\nRun: python3 run.py --help\n"
        )
        (staging / LOCK_FILE).unlink()  # the lock holds through its open file until the block ends
        os.replace(staging, output)
    size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    return RuntimeBundle(output, size)


def _this_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def write_runtime_files(
    dest: str | os.PathLike, cuda: bool, python_version: str | None = None, with_tokenizer: bool = False
) -> None:
    """Everything that runs an artifact without TVM installed, into `dest`: tvm_libs/ (TVM's runtime
    libraries, + CUDA's for cuda) and python/ (the runtime-only tensorpress, tvm_ffi built for
    `python_version` (default: this Python), typing_extensions, and with_tokenizer the `tokenizers`
    package, abi3, for text prompts). The GPU kit uses it too."""
    dest = Path(dest)
    python_version = python_version or _this_python()
    _copy_tvm_libs(dest / "tvm_libs", cuda)
    _copy_runtime_package(dest / "python" / "tensorpress")
    if python_version == _this_python():
        _copy_tvm_ffi(_installed_tvm_ffi(), dest / "python" / "tvm_ffi")
    else:
        _download_tvm_ffi(python_version, dest / "python")
    _copy_pure_python_dependencies(dest / "python")
    if with_tokenizer:
        _copy_tokenizers(dest / "python")


def write_weight_formats(package: str | os.PathLike) -> None:
    """tensorpress.compiler.formats (numpy only at import) into a runtime-only tensorpress at `package`,
    with the TVM-free decode-stage interface its format files subclass: the GPU kits pack weights on the
    device with the very code the compiler packs with."""
    package = Path(package)
    formats = package / "compiler" / "formats"
    formats.mkdir(parents=True)
    docstring = '"""Only the storage formats: the GPU kit packs weights with them."""\n'
    (package / "compiler" / "__init__.py").write_text(docstring)
    for source in sorted((PACKAGE_ROOT / "compiler" / "formats").glob("*.py")):
        shutil.copyfile(source, formats / source.name)
    (package / "schedules").mkdir(exist_ok=True)
    for name in ("__init__.py", "decode_stage.py"):
        if not (package / "schedules" / name).exists():
            shutil.copyfile(PACKAGE_ROOT / "schedules" / name, package / "schedules" / name)


def _copy_tokenizers(dest: Path) -> None:
    """Hugging Face `tokenizers` (Rust, one abi3 library for every CPython >= 3.10), text prompts only."""
    try:
        import tokenizers
    except ImportError:
        return  # the bundle still runs; text prompts then say that `tokenizers` is missing
    source = Path(tokenizers.__file__).parent
    shutil.copytree(source, dest / "tokenizers", ignore=shutil.ignore_patterns("__pycache__", "*.pyi"))


def _copy_tvm_libs(dest: Path, cuda: bool) -> None:
    from tensorpress.runtime.tvm_runtime import tvm_lib_dir

    dest.mkdir(parents=True)
    lib_dir = tvm_lib_dir()
    names = ["libtvm_runtime.so"] + (["libtvm_runtime_cuda.so"] if cuda else [])
    for name in names:
        shutil.copyfile(lib_dir / name, dest / name)
    if cuda:
        from tensorpress.compiler.cuda.toolchain import cuda_home

        home = cuda_home()
        candidates = sorted((home / "lib64").glob("libcudart.so.13*")) if home else []
        if not candidates:
            raise TensorpressError("libcudart.so.13 (CUDA 13 runtime) was not found to put in the bundle.")
        shutil.copyfile(candidates[0], dest / "libcudart.so.13")


def _copy_runtime_package(dest: Path) -> None:
    dest.mkdir(parents=True)
    for name in ("__init__.py", "errors.py", "cli.py"):
        shutil.copyfile(PACKAGE_ROOT / "tensorpress" / name, dest / name)
    shutil.copytree(PACKAGE_ROOT / "runtime", dest / "runtime", ignore=shutil.ignore_patterns("__pycache__"))


def _copy_pure_python_dependencies(dest: Path) -> None:
    """tvm_ffi's one dependency, typing_extensions (a single pure-Python file)."""
    import typing_extensions

    shutil.copyfile(typing_extensions.__file__, dest / "typing_extensions.py")


def _installed_tvm_ffi() -> Path:
    import tvm_ffi

    return Path(tvm_ffi.__file__).parent


def _copy_tvm_ffi(source: Path, dest: Path) -> None:
    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n in TVM_FFI_SKIP or n.endswith((".pyx", ".pxi", ".pyi"))]

    shutil.copytree(source, dest, ignore=ignore)


def _download_tvm_ffi(python_version: str, dest: Path) -> None:
    """Fetch the apache-tvm-ffi wheel of this version for another Python and unpack what runs."""
    import tvm_ffi

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--python-version", python_version, "--implementation", "cp",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64", "-d", tmp, f"apache-tvm-ffi=={tvm_ffi.__version__}",
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise TensorpressError(
                f"could not download apache-tvm-ffi {tvm_ffi.__version__} for Python {python_version} "
                f"({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no wheel'})."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(Path(tmp) / "unpacked")
        _copy_tvm_ffi(Path(tmp) / "unpacked" / "tvm_ffi", dest / "tvm_ffi")
