"""Write an artifact (see `tensorpress.runtime.artifact` for the layout) so that it appears whole or not
at all (`atomic_output`), and byte for byte the same for the same input: every zip member carries one
fixed date (1980-01-01, the earliest a zip holds) and the manifest no creation time, unless the build
gives one (`SOURCE_DATE_EPOCH`, the reproducible-builds convention) or the user asks for the clock's
(`record_time=True`, `tensorpress compile --record-time`)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tensorpress.errors import ConfigError
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

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip member can carry


def build_time(record_time: bool = False) -> float | None:
    """The time an artifact records, in seconds since 1970 (UTC): SOURCE_DATE_EPOCH where set, the
    clock's time where `record_time`, else None (nothing recorded: the artifact is reproducible)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch:
        if not epoch.isdigit():
            raise ConfigError(f"SOURCE_DATE_EPOCH={epoch!r} must be whole seconds since 1970 (e.g. 1700000000).")
        return float(epoch)
    return time.time() if record_time else None


def _member(name: str, when: float | None) -> zipfile.ZipInfo:
    """A stored zip member with a reproducible header: the build time (or 1980), mode 0644."""
    date = ZIP_EPOCH if when is None else max(ZIP_EPOCH, time.gmtime(when)[:6])
    info = zipfile.ZipInfo(name, date_time=date)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


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
    record_time: bool = False,
) -> dict[str, Any]:
    """Write library + weights + manifest (+ extra files the model needs at run time, e.g. its
    tokenizer.json, stored as files/<name>) into one artifact at `path`; returns the final manifest.

    store_weights=False writes the weights member as the safetensors header alone (every name, dtype,
    shape and offset, no data): the runtime then takes the values at load time.
    The manifest's "created" (ISO 8601, UTC) and the members' dates are `build_time(record_time)`: None
    and 1980 unless SOURCE_DATE_EPOCH is set or record_time asks for the clock."""
    when = build_time(record_time)
    manifest = dict(manifest)
    manifest["created"] = None if when is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    manifest["format"] = FORMAT_NAME
    manifest["format_version"] = FORMAT_VERSION
    parts: dict[str, dict[str, Any]] = {}
    with atomic_output(path) as out, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        digest = hashlib.sha256()
        size = 0
        with open(library, "rb") as lib, zf.open(_member(LIBRARY, when), "w", force_zip64=True) as member:
            while chunk := lib.read(8 << 20):
                member.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        parts[LIBRARY] = {"sha256": digest.hexdigest(), "bytes": size}
        digest, size = hashlib.sha256(), 0
        with zf.open(_member(WEIGHTS, when), "w", force_zip64=True) as member:
            values = (np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes() for a in params.values())
            chunks = itertools.chain([_safetensors_header(params)], values if store_weights else [])
            for chunk in chunks:
                member.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        parts[WEIGHTS] = {"sha256": digest.hexdigest(), "bytes": size}
        for name, source in (extra_files or {}).items():
            data = Path(source).read_bytes()
            zf.writestr(_member(EXTRA_FILES_DIR + name, when), data)
            parts[EXTRA_FILES_DIR + name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        manifest["parts"] = parts
        zf.writestr(_member(MANIFEST, when), json.dumps(manifest, indent=1, sort_keys=False))
    return manifest
