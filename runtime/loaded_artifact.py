"""An artifact loaded on a device: the Relax VM, its weights on the device, the manifest.

This is what every model class of the runtime (`GraphModel`, `DecoderModel`) is built from. Loading
checks, before anything runs, that the artifact was built for this kind of device and GPU architecture.

Threads: a Relax VM keeps its call frames and registers in the VM object, so two threads calling one
VM at once corrupt each other (TVM "Check failed: reg < frame->register_file.size()", then a
segfault). A `LoadedArtifact` therefore gives each calling thread its own VM state (`vm`), made on
the thread's first call from the one loaded executable; the weights, the compiled code and the
(thread-safe) memory pools are shared, so a thread costs a VM object, not a copy of the model.
(`benchmarks/runtime_threads_cpu.py` measures this against one lock around a single VM.)
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tensorpress.errors import ArtifactError, DeviceMismatchError, InputError, TensorpressError
from tensorpress.runtime import tvm_runtime
from tensorpress.runtime.artifact import LIBRARY, SAFETENSORS_DTYPES, WEIGHTS, ArtifactFile, open_artifact
from tensorpress.runtime.host_cpu import missing_cpu_flags

# The GPU architectures `tensorpress compile --target cuda:ARCH` accepts (compiler/targets.py CUDA_ARCHS,
# copied because the runtime never imports the compiler; a test keeps the two equal).
BUILDABLE_CUDA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a")


@dataclass
class LoadedArtifact:
    path: Path
    manifest: dict[str, Any]
    device: Any  # tvm_ffi Device
    device_name: str  # "cpu" or "cuda:0"
    executable: Any  # the loaded library; each thread's VM is made from it
    vm_init: list[int]  # vm_initialization's arguments: device kind, index, allocator (then the host's)
    params: list[Any]  # weights on the device, in the functions' trailing-parameter order
    param_names: list[str]
    file: ArtifactFile | None = None
    _per_thread: threading.local = field(default_factory=threading.local, repr=False)

    @property
    def vm(self) -> Any:
        """The calling thread's Relax VM (call vm["main"](...)); made on the thread's first use."""
        state = self._per_thread
        vm = getattr(state, "vm", None)
        if vm is None:
            vm = self.executable["vm_load_executable"]()
            vm["vm_initialization"](*self.vm_init)
            state.vm, state.functions = vm, {}
        return vm

    def function(self, name: str) -> Any:
        """The calling thread's handle to the compiled function `name` (looked up once per thread)."""
        vm = self.vm
        functions = self._per_thread.functions
        if name not in functions:
            functions[name] = vm[name]
        return functions[name]

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


MODEL_KINDS = ("graph", "decoder")
_TENSOR_FIELDS = (("name", str), ("shape", list), ("dtype", str))


def check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Refuse, in one sentence, a manifest whose fields the loader relies on are missing or of the
    wrong type (a hand-edited or crafted file), before anything is loaded."""

    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"{path}: its manifest {what}; recompile the artifact.")

    kind = manifest.get("kind")
    if kind not in MODEL_KINDS:
        raise bad(f"names an unknown model kind {kind!r} (this runtime loads {' or '.join(MODEL_KINDS)})")
    target = manifest.get("target")
    if not isinstance(target, dict) or target.get("kind") not in ("cpu", "cuda"):
        raise bad(f"has no valid target (expected {{'kind': 'cpu' or 'cuda', ...}}, got {target!r})")
    if target["kind"] == "cuda" and not isinstance(target.get("arch"), str):
        raise bad(f"has a CUDA target without its GPU architecture (got arch {target.get('arch')!r})")
    flags = manifest.get("cpu_flags", [])
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise bad("has cpu_flags that are not a list of names")
    functions = manifest.get("functions")
    if not isinstance(functions, dict) or not all(
        isinstance(f, dict) and isinstance(f.get("params"), list) for f in functions.values()
    ):
        raise bad("has no valid functions table (each function with its list of params)")
    for side in ("inputs", "outputs"):
        specs = manifest.get(side)
        if not isinstance(specs, list) or not all(
            isinstance(t, dict) and all(isinstance(t.get(k), kind_) for k, kind_ in _TENSOR_FIELDS) for t in specs
        ):
            raise bad(f"has no valid {side} (a list of {{name, shape, dtype}})")
    if kind == "graph" and "main" not in functions:
        raise bad("describes a graph model without its main function")
    if kind == "decoder":
        section = manifest.get("decoder", (manifest.get("info") or {}).get("decoder"))
        needed = {"config": dict, "page_size": int, "functions": dict}
        if not isinstance(section, dict) or not all(isinstance(section.get(k), t) for k, t in needed.items()):
            raise bad("describes a decoder without a valid decoder section")
        tensors = section.get("cache_tensors")
        if tensors is None and "cache_shape" in section:  # written before the list: one tensor
            tensors = [{"name": "kv_pages", "shape": section["cache_shape"], "dtype": section.get("cache_dtype")}]
        if (
            not isinstance(tensors, list)
            or not tensors
            or not all(
                isinstance(t, dict) and all(isinstance(t.get(k), kind_) for k, kind_ in _TENSOR_FIELDS) for t in tensors
            )
        ):
            raise bad("describes a decoder without a valid list of KV cache tensors")
        if "bytes_per_token" in section and not isinstance(section["bytes_per_token"], int):
            raise bad("describes a decoder whose KV cache bytes per token is not a number")


def check_device_fits(manifest: dict[str, Any], kind: str, index: int, path: Path) -> None:
    """Refuse, in one sentence, an artifact that cannot run on the chosen device."""
    target = manifest["target"]
    if target["kind"] != kind:
        raise DeviceMismatchError(
            f"{path} was built for {target['kind']}, not {kind}; load it with device="
            f"'{'cuda:0' if target['kind'] == 'cuda' else 'cpu'}' or recompile it with --target {kind}."
        )
    if kind == "cpu":
        missing = missing_cpu_flags(manifest.get("cpu_flags", []))
        if missing:
            raise DeviceMismatchError(
                f"{path} was built for CPUs with {', '.join(manifest['cpu_flags'])}; this CPU lacks "
                f"{', '.join(missing)}; recompile it with --target cpu (x86-64-v3) or --target cpu:native."
            )
        return
    arch = target["arch"]
    try:
        info = tvm_runtime.cuda_device_info(index)
        absent = None if info["exists"] else f"no device cuda:{index}"
    except DeviceMismatchError:  # no NVIDIA driver at all
        absent = "no NVIDIA driver (libcuda.so.1)"
    if absent:
        # Not "use device='cpu'": this artifact holds GPU code only.
        raise DeviceMismatchError(
            f"{path} was built for a CUDA GPU ({arch}), but this machine has {absent}; run it on a machine with "
            "an NVIDIA GPU, or recompile it with --target cpu."
        )
    have = "sm_" + info["compute_version"].replace(".", "")
    if not cuda_arch_runs_on(arch, have):
        rebuild = have + "a" if have == "sm_90" else have  # Hopper gets the sm_90a (wgmma) kernels
        if rebuild not in BUILDABLE_CUDA_ARCHS:
            raise DeviceMismatchError(
                f"{path} was built for {arch}, but cuda:{index} is {have}, which tensorpress cannot build for "
                f"(it builds for {', '.join(BUILDABLE_CUDA_ARCHS)}); run it on a GPU that runs {arch} code or "
                "recompile it with --target cpu."
            )
        raise DeviceMismatchError(
            f"{path} was built for {arch}, but cuda:{index} is {have}; recompile it with --target cuda:{rebuild}."
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


def weight_specs(artifact: ArtifactFile) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, numpy dtype name)} of every weight, in parameter order, from the safetensors header
    (present whether or not the values were stored)."""
    offset, _ = artifact.offsets[WEIGHTS]
    with open(artifact.path, "rb") as f:
        f.seek(offset)
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    ordered = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return {name: (tuple(e["shape"]), np.dtype(SAFETENSORS_DTYPES[e["dtype"]]).name) for name, e in ordered}


def weights_on_device(artifact: ArtifactFile, weights: dict[str, Any] | None, dev) -> tuple[list[str], list[Any]]:
    """(names, device tensors) in parameter order: the artifact's own weights, or `weights` instead.

    `weights` maps every weight name to a numpy array (copied to the device) or to a tensor already on
    the device that supports DLPack, e.g. a torch CUDA tensor (used in place, not copied); names,
    shapes and dtypes must be exactly the artifact's."""
    specs = weight_specs(artifact)
    stored = artifact.manifest.get("weights", {}).get("stored", True)
    if weights is None:
        if not stored:
            raise ArtifactError(
                f"{artifact.path} holds no weight values (compiled with store_weights=False); pass them as "
                "tensorpress.runtime.load(path, weights={name: array})."
            )
        arrays = artifact.weights()
        return list(arrays), [tvm_runtime.to_device(np.array(arrays[name]), dev) for name in arrays]
    missing, extra = [n for n in specs if n not in weights], [n for n in weights if n not in specs]
    if missing or extra:
        raise InputError(
            f"the weights given for {artifact.path.name} do not match its parameters: missing "
            f"{missing[:3] or 'none'}{' ...' if len(missing) > 3 else ''}, unknown {extra[:3] or 'none'}"
            f"{' ...' if len(extra) > 3 else ''}; pass exactly the names of manifest['weights']."
        )
    tensors = []
    for name, (shape, dtype) in specs.items():
        value = weights[name]
        if isinstance(value, np.ndarray):
            got_shape, got_dtype = tuple(value.shape), value.dtype.name
            tensor = tvm_runtime.to_device(value, dev) if (got_shape, got_dtype) == (shape, dtype) else None
        else:
            tensor = tvm_runtime.ffi().from_dlpack(value)
            got_shape, got_dtype = tuple(int(d) for d in tensor.shape), str(tensor.dtype)
            if tensor.device.dlpack_device_type() != dev.dlpack_device_type():
                raise InputError(f"weight {name} is on {tensor.device}, not on {dev}; move it to the model's device.")
        if (got_shape, got_dtype) != (shape, dtype):
            raise InputError(
                f"weight {name} is {got_dtype} {list(got_shape)} but {artifact.path.name} needs {dtype} {list(shape)}."
            )
        tensors.append(tensor)
    return list(specs), tensors


def load_artifact(
    path: str | os.PathLike, device: str = "cpu", verify: bool = True, weights: dict[str, Any] | None = None
) -> LoadedArtifact:
    """Open, verify and load an artifact onto `device`: VM initialised, weights copied to the device
    (or `weights` used instead of the stored ones, see `weights_on_device`)."""
    artifact: ArtifactFile = open_artifact(path, verify=verify)
    check_manifest(artifact.manifest, artifact.path)
    kind, index = parse_device(device)
    check_device_fits(artifact.manifest, kind, index, artifact.path)
    dev = tvm_runtime.device(kind, index)
    # dlopen needs a file: the library is copied out of the zip into a private temporary folder,
    # removed as soon as it is loaded (the mapping outlives the file), so a killed process leaves nothing.
    with tempfile.TemporaryDirectory(prefix="tensorpress-") as tmp:
        lib_path = Path(tmp) / LIBRARY
        lib_path.write_bytes(artifact.read_member(LIBRARY))
        executable = tvm_runtime.load_module(lib_path)
    init = [dev.dlpack_device_type(), index, tvm_runtime.POOLED_ALLOCATOR]
    if kind != "cpu":
        init += [tvm_runtime.KDL_CPU, 0, tvm_runtime.POOLED_ALLOCATOR]
    names, params = weights_on_device(artifact, weights, dev)
    loaded = LoadedArtifact(artifact.path, artifact.manifest, dev, device, executable, init, params, names, artifact)
    _ = loaded.vm  # the loading thread's VM now, so a bad library fails at load, not at the first call
    return loaded
