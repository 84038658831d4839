"""Write an artifact (see `tensorpress.runtime.artifact` for the layout) so that it appears whole or not
at all (`atomic_output`)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tensorpress.runtime.artifact import (
    EXTRA_FILES_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    LIBRARY,
    MANIFEST,
    NUMPY_TO_SAFETENSORS,
    WEIGHTS,
)
from tensorpress.runtime.atomic_file import atomic_output


def _safetensors_header(params: dict[str, np.ndarray]) -> bytes:
    header: dict[str, Any] = {}
    offset = 0
    for name, array in params.items():
        dtype = NUMPY_TO_SAFETENSORS.get(np.dtype(array.dtype).newbyteorder("<").str)
        if dtype is None:
            raise TypeError(f"weight {name} has dtype {array.dtype}, which safetensors cannot store")
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as the safetensors library writes it
    return len(raw).to_bytes(8, "little") + raw


def write_artifact(
    path: str | os.PathLike,
    library: str | os.PathLike,
    params: dict[str, np.ndarray],
    manifest: dict[str, Any],
    extra_files: dict[str, str | os.PathLike] | None = None,
    store_weights: bool = True,
) -> dict[str, Any]:
    """Write library + weights + manifest (+ extra files the model needs at run time, e.g. its
    tokenizer.json, stored as files/<name>) into one artifact at `path`; returns the final manifest.

    store_weights=False writes the weights member as the safetensors header alone (every name, dtype,
    shape and offset, no data): the runtime then takes the values at load time."""
    manifest = dict(manifest)
    manifest["format"] = FORMAT_NAME
    manifest["format_version"] = FORMAT_VERSION
    parts: dict[str, dict[str, Any]] = {}
    with atomic_output(path) as out, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        digest = hashlib.sha256()
        size = 0
        with open(library, "rb") as lib, zf.open(LIBRARY, "w", force_zip64=True) as member:
            while chunk := lib.read(8 << 20):
                member.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        parts[LIBRARY] = {"sha256": digest.hexdigest(), "bytes": size}
        digest, size = hashlib.sha256(), 0
        with zf.open(WEIGHTS, "w", force_zip64=True) as member:
            values = (np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes() for a in params.values())
            chunks = itertools.chain([_safetensors_header(params)], values if store_weights else [])
            for chunk in chunks:
                member.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        parts[WEIGHTS] = {"sha256": digest.hexdigest(), "bytes": size}
        for name, source in (extra_files or {}).items():
            data = Path(source).read_bytes()
            zf.writestr(EXTRA_FILES_DIR + name, data)
            parts[EXTRA_FILES_DIR + name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        manifest["parts"] = parts
        zf.writestr(MANIFEST, json.dumps(manifest, indent=1, sort_keys=False))
    return manifest
