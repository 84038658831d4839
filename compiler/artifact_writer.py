"""Write an artifact (see `tensorpress.runtime.artifact` for the layout) so that it appears whole or not at all.

The file is built in an unnamed temporary file in the destination folder (Linux O_TMPFILE: if the
process is killed, there is nothing to clean up) and linked into place only when complete; where
O_TMPFILE is unavailable, a hidden temporary name is used and removed on any error.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tensorpress.runtime.artifact import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LIBRARY,
    MANIFEST,
    NUMPY_TO_SAFETENSORS,
    WEIGHTS,
)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Any]:
    """Yield a writable binary file; on success it becomes `path`, on any error nothing is left."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd = None
    if hasattr(os, "O_TMPFILE"):
        with contextlib.suppress(OSError):
            fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o644)
    if fd is not None:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            # Give the finished file a temporary name, then rename over the destination (atomic).
            tmp_name = folder / f".{path.name}.{os.getpid()}.tmp"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N gives the unnamed file a name; os.link only
            # calls linkat (rather than link) when a dir_fd is given.
            proc_fd = os.open("/proc/self/fd", os.O_RDONLY)
            try:
                os.link(str(f.fileno()), tmp_name, src_dir_fd=proc_fd, follow_symlinks=True)
            finally:
                os.close(proc_fd)
        os.replace(tmp_name, path)
        return
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _safetensors_header(params: dict[str, np.ndarray]) -> bytes:
    header: dict[str, Any] = {}
    offset = 0
    for name, array in params.items():
        dtype = NUMPY_TO_SAFETENSORS.get(np.dtype(array.dtype).newbyteorder("<").str)
        if dtype is None:
            raise TypeError(f"weight {name} has dtype {array.dtype}, which safetensors cannot store")
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as the safetensors library writes it
    return len(raw).to_bytes(8, "little") + raw


def write_artifact(
    path: str | os.PathLike, library: str | os.PathLike, params: dict[str, np.ndarray], manifest: dict[str, Any]
) -> dict[str, Any]:
    """Write library + weights + manifest into one artifact at `path`; returns the final manifest."""
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
            chunks = itertools.chain(
                [_safetensors_header(params)],
                (np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes() for a in params.values()),
            )
            for chunk in chunks:
                member.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        parts[WEIGHTS] = {"sha256": digest.hexdigest(), "bytes": size}
        manifest["parts"] = parts
        zf.writestr(MANIFEST, json.dumps(manifest, indent=1, sort_keys=False))
    return manifest
