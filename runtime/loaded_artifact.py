"""An artifact loaded on a device: the Relax VM, its weights on the device, the manifest.

This is what every model class of the runtime (`GraphModel`, `DecoderModel`) is built from. Loading
checks, before anything runs, that the artifact was built for this kind of device and GPU architecture.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tensorpress.errors import DeviceMismatchError, TensorpressError
from tensorpress.runtime import tvm_runtime
from tensorpress.runtime.artifact import LIBRARY, ArtifactFile, open_artifact

CPU_FLAGS_FILE = "/proc/cpuinfo"


@dataclass
class LoadedArtifact:
    path: Path
    manifest: dict[str, Any]
    device: Any  # tvm_ffi Device
    device_name: str  # "cpu" or "cuda:0"
    vm: Any  # the Relax VM module (call vm["main"](...))
    params: list[Any]  # weights on the device, in the functions' trailing-parameter order
    param_names: list[str]
    file: ArtifactFile | None = None
    _keepalive: list[Any] = field(default_factory=list)

    def read_file(self, name: str) -> bytes:
        """An extra file packed with the model (e.g. "tokenizer.json"); KeyError when there is none."""
        if self.file is None:
            raise KeyError(name)
        return self.file.read_file(name)

    def empty(self, shape, dtype: str) -> Any:
        """An uninitialised tensor on this artifact's device."""
        return tvm_runtime.empty(shape, dtype, self.device)

    def free_memory_bytes(self) -> int:
        """Memory still free on the device (the host's available memory for the CPU)."""
        return tvm_runtime.free_memory_bytes(self.device)

    def to_device(self, array: np.ndarray) -> Any:
        return tvm_runtime.to_device(array, self.device)

    def to_numpy(self, tensor: Any) -> np.ndarray:
        return tvm_runtime.to_numpy(tensor)

    def function_params(self, function: str) -> list[Any]:
        """The device weights a VM function takes after its inputs (manifest["functions"][f]["params"])."""
        names = self.manifest["functions"][function]["params"]
        index = {name: i for i, name in enumerate(self.param_names)}
        return [self.params[index[name]] for name in names]


def parse_device(device: str) -> tuple[str, int]:
    """'cpu' | 'cuda' | 'cuda:N' -> (kind, index)."""
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", device.strip().lower())
    if not match:
        raise TensorpressError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'.")
    return match.group(1), int(match.group(2) or 0)


def check_device_fits(manifest: dict[str, Any], kind: str, index: int, path: Path) -> None:
    """Refuse, in one sentence, an artifact that cannot run on the chosen device."""
    target = manifest["target"]
    if target["kind"] != kind:
        raise DeviceMismatchError(
            f"{path} was built for {target['kind']}, not {kind}; load it with device="
            f"'{'cuda:0' if target['kind'] == 'cuda' else 'cpu'}' or recompile it with --target {kind}."
        )
    if kind == "cpu":
        missing = [flag for flag in manifest.get("cpu_flags", []) if flag not in _host_cpu_flags()]
        if missing:
            raise DeviceMismatchError(
                f"{path} was built for CPUs with {', '.join(manifest['cpu_flags'])}; this CPU lacks "
                f"{', '.join(missing)}."
            )
        return
    info = tvm_runtime.cuda_device_info(index)
    if not info["exists"]:
        raise DeviceMismatchError(f"there is no CUDA device cuda:{index} on this machine; use device='cpu'.")
    arch = target["arch"]
    have = "sm_" + info["compute_version"].replace(".", "")
    if not cuda_arch_runs_on(arch, have):
        raise DeviceMismatchError(
            f"{path} was built for {arch}, but cuda:{index} is {have}; recompile it with --target cuda:{have}"
            f"{'a' if have == 'sm_90' else ''}."
        )


def cuda_arch_runs_on(built: str, device: str) -> bool:
    """CUDA binary compatibility: sm_XY runs on sm_XZ with Z >= Y; an `a` arch only on its own GPU."""
    b = re.fullmatch(r"sm_(\d+)(\d)(a?)", built)
    d = re.fullmatch(r"sm_(\d+)(\d)a?", device)
    if not b or not d:
        return False
    if b.group(3):
        return b.group(1) == d.group(1) and b.group(2) == d.group(2)
    return b.group(1) == d.group(1) and int(d.group(2)) >= int(b.group(2))


def _host_cpu_flags() -> set[str]:
    try:
        with open(CPU_FLAGS_FILE) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_artifact(path: str | os.PathLike, device: str = "cpu", verify: bool = True) -> LoadedArtifact:
    """Open, verify and load an artifact onto `device`: VM initialised, weights copied to the device."""
    artifact: ArtifactFile = open_artifact(path, verify=verify)
    kind, index = parse_device(device)
    check_device_fits(artifact.manifest, kind, index, artifact.path)
    dev = tvm_runtime.device(kind, index)
    # dlopen needs a file: the library is copied out of the zip into a private temporary folder.
    tmpdir = tempfile.TemporaryDirectory(prefix="tensorpress-")
    lib_path = Path(tmpdir.name) / LIBRARY
    lib_path.write_bytes(artifact.read_member(LIBRARY))
    executable = tvm_runtime.load_module(lib_path)
    vm = executable["vm_load_executable"]()
    init = [dev.dlpack_device_type(), index, tvm_runtime.POOLED_ALLOCATOR]
    if kind != "cpu":
        init += [tvm_runtime.KDL_CPU, 0, tvm_runtime.POOLED_ALLOCATOR]
    vm["vm_initialization"](*init)
    weights = artifact.weights()
    names = list(weights)
    params = [tvm_runtime.to_device(np.array(weights[name]), dev) for name in names]
    return LoadedArtifact(
        artifact.path, artifact.manifest, dev, device, vm, params, names, artifact, [tmpdir, executable]
    )
