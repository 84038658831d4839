"""A compiled graph model (encoder, CNN, MLP): `run(inputs) -> outputs`, numpy in, numpy out."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tensorpress.errors import InputError
from tensorpress.runtime import cpu_threads
from tensorpress.runtime.loaded_artifact import LoadedArtifact


@dataclass(frozen=True)
class TensorSignature:
    name: str
    shape: tuple[int | str, ...]  # a str is a symbolic dimension ("batch"), "?" is unknown
    dtype: str

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSignature, ...]
    outputs: tuple[TensorSignature, ...]

    def __str__(self) -> str:
        ins = ", ".join(str(t) for t in self.inputs)
        outs = ", ".join(str(t) for t in self.outputs)
        return f"({ins}) -> ({outs})"


def _specs(entries) -> tuple[TensorSignature, ...]:
    return tuple(TensorSignature(e["name"], tuple(e["shape"]), e["dtype"]) for e in entries)


def read_npz_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The named arrays of an .npz file (what `np.savez(path, x=...)` writes); InputError, one sentence,
    for a missing file, a folder, or anything that is not an .npz of plain (non-object) arrays."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory; --inputs needs an .npz file (np.savez(path, x=array)).")
    if not path.is_file():
        raise InputError(f"inputs file {path} does not exist.")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path} is not an .npz file; write the inputs with np.savez(path, x=array, ...).")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except ValueError as err:  # numpy: object arrays need allow_pickle, never allowed here
        raise InputError(f"{path} holds an array of Python objects; save plain numeric arrays instead.") from err
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise InputError(f"{path} is a damaged .npz file; write it again with np.savez.") from err


class GraphModel:
    """A loaded graph artifact. `model.run({"x": x})` or `model.run([x])` -> list of numpy outputs.

    Thread-safe: threads may share one GraphModel and call `run` at once (see `tensorpress.runtime`)."""

    def __init__(self, loaded: LoadedArtifact):
        self.loaded = loaded
        self.signature = Signature(_specs(loaded.manifest["inputs"]), _specs(loaded.manifest["outputs"]))
        self._weights = loaded.function_params("main")
        self._on_cpu = loaded.device.dlpack_device_type() == cpu_threads.KDL_CPU

    @property
    def manifest(self) -> dict[str, Any]:
        return self.loaded.manifest

    def run(self, inputs: Mapping[str, Any] | Sequence[Any]) -> list[np.ndarray]:
        """Run the model. Inputs by name (dict) or in signature order (list): numpy arrays or DLPack
        tensors. Raises InputError naming the input, for a missing/unknown name, shape or dtype."""
        arrays = self._check_inputs(inputs)
        main = self.loaded.function("main")
        device_inputs = [self.loaded.to_device(a) for a in arrays]
        chooser = cpu_threads.chooser_for_this_thread() if self._on_cpu else None
        if chooser is None:
            result = main(*device_inputs, *self._weights)
        else:  # single-threaded or on the whole pool, whichever is faster now for inputs of this size
            key = (id(self), sum(a.size for a in arrays).bit_length())
            result = chooser.run(key, lambda: main(*device_inputs, *self._weights))
        outputs = list(result) if _is_sequence(result) else [result]
        return [self.loaded.to_numpy(o) for o in outputs]

    def _check_inputs(self, inputs) -> list[np.ndarray]:
        specs = self.signature.inputs
        names = [s.name for s in specs]
        if isinstance(inputs, Mapping):
            unknown = [k for k in inputs if k not in names]
            if unknown:
                raise InputError(f"the model has no input named {unknown[0]!r}; its inputs are {', '.join(names)}.")
            missing = [n for n in names if n not in inputs]
            if missing:
                raise InputError(f"input {missing[0]!r} is missing; the model takes {', '.join(names)}.")
            values = [inputs[n] for n in names]
        else:
            values = list(inputs)
            if len(values) != len(specs):
                raise InputError(f"the model takes {len(specs)} inputs ({', '.join(names)}), got {len(values)}.")
        symbols: dict[str, int] = {}
        arrays = []
        for spec, value in zip(specs, values):
            array = _as_numpy(value, spec.name)
            if str(array.dtype) != spec.dtype:
                raise InputError(f"input {spec.name!r} must be {spec.dtype}, got {array.dtype}.")
            if array.ndim != len(spec.shape):
                raise InputError(
                    f"input {spec.name!r} must have {len(spec.shape)} dimensions {list(spec.shape)}, "
                    f"got shape {list(array.shape)}."
                )
            for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
                if isinstance(want, int) and want != got:
                    raise InputError(
                        f"input {spec.name!r} must have size {want} on axis {axis} (shape {list(spec.shape)}), "
                        f"got shape {list(array.shape)}."
                    )
                if isinstance(want, str) and want != "?" and symbols.setdefault(want, got) != got:
                    raise InputError(
                        f"input {spec.name!r} has {want}={got} on axis {axis}, but another input has "
                        f"{want}={symbols[want]}; they must agree."
                    )
            arrays.append(array)
        return arrays


def _as_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "__dlpack__"):
        try:
            return np.from_dlpack(value)
        except (BufferError, RuntimeError, TypeError) as err:
            if hasattr(value, "cpu"):
                return np.from_dlpack(value.cpu())
            raise InputError(f"input {name!r} is a DLPack tensor numpy cannot read ({err}).") from err
    try:
        return np.asarray(value)
    except Exception as err:
        raise InputError(f"input {name!r} is not an array ({type(value).__name__}).") from err


def _is_sequence(result: Any) -> bool:
    return not hasattr(result, "shape") and hasattr(result, "__len__")
