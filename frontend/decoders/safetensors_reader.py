"""Read the tensors of a Hugging Face folder's *.safetensors files into numpy, bf16 included.

numpy has no bfloat16, and safetensors' numpy loader refuses it, so this reads the format directly
(8-byte little-endian header length, JSON header {name: {dtype, shape, data_offsets}}, raw bytes) and
widens bf16 to float32 exactly (bf16 is the upper half of an IEEE float32).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from tensorpress.errors import ModelImportError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _read_file(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    try:
        (header_len,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + header_len])
    except (struct.error, ValueError) as err:
        raise ModelImportError(f"{path}: not a readable safetensors file ({err}).") from None
    body = memoryview(raw)[8 + header_len :]
    out: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        kind = entry["dtype"]
        if kind == "BF16":
            bits = np.frombuffer(body[begin:end], dtype=np.uint16).astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif kind in _DTYPES:
            array = np.frombuffer(body[begin:end], dtype=_DTYPES[kind])
        else:
            raise ModelImportError(f"{path}: tensor {name} has dtype {kind}, which tensorpress cannot read.")
        out[name] = array.reshape(entry["shape"])
    return out


def read_safetensors_folder(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of all *.safetensors files in `folder` (sharded checkpoints included), by name."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelImportError(f"{folder}: no *.safetensors weights found (save with safetensors).")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(_read_file(f))
    return tensors
