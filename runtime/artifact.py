"""The artifact file: one zip (stored, not compressed) holding everything a model needs to run.

    model.tpk (zip, ZIP_STORED)
    ├── manifest.json        format version, versions, target + GPU arch, signature, layers, sha256 of parts
    ├── library.so           the compiled kernels + Relax VM executable (host code + GPU fatbin)
    ├── weights.safetensors  every weight the functions take, in their parameter order
    └── files/               what else the model needs at run time (a decoder's tokenizer.json)

Members are stored uncompressed so the weights can be memory-mapped straight out of the zip. The
reader checks the manifest's format version and every part's size and sha256 before anything is
loaded, so a truncated or corrupt file is refused with one sentence. Only numpy and the standard
library are used here (the runtime never imports the compiler).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tensorpress.errors import ArtifactError

FORMAT_NAME = "tensorpress-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "library.so"
WEIGHTS = "weights.safetensors"
EXTRA_FILES_DIR = "files/"

# safetensors dtype names <-> numpy
SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
NUMPY_TO_SAFETENSORS = {np.dtype(v).str: k for k, v in SAFETENSORS_DTYPES.items()}


def sha256_of(path_or_file, offset: int = 0, size: int | None = None) -> str:
    """sha256 of `size` bytes of a file from `offset` (the whole file by default), read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path_or_file, "rb") as f:
        f.seek(offset)
        remaining = size
        while remaining is None or remaining > 0:
            chunk = f.read(8 << 20 if remaining is None else min(8 << 20, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return digest.hexdigest()


@dataclass
class ArtifactFile:
    """An opened, verified artifact: its manifest and where each part lies inside the zip."""

    path: Path
    manifest: dict[str, Any]
    offsets: dict[str, tuple[int, int]]  # member -> (byte offset of its data in the file, size)

    def read_member(self, member: str) -> bytes:
        offset, size = self.offsets[member]
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def read_file(self, name: str) -> bytes:
        """An extra file packed with the model (e.g. "tokenizer.json"); KeyError when there is none."""
        member = EXTRA_FILES_DIR + name
        if member not in self.offsets:
            raise KeyError(name)
        return self.read_member(member)

    def weights(self) -> dict[str, np.ndarray]:
        """Weights as read-only numpy arrays memory-mapped from the file (insertion order = file order)."""
        offset, size = self.offsets[WEIGHTS]
        return read_safetensors(self.path, offset, size)


def open_artifact(path: str | os.PathLike, verify: bool = True) -> ArtifactFile:
    """Open and check an artifact. Raises ArtifactError naming the file and what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory, not an artifact; give the .tpk file that `compile -o` wrote.")
    if not path.is_file():
        raise ArtifactError(f"artifact {path} does not exist.")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {info.filename: info for info in zf.infolist()}
            if MANIFEST not in infos:
                raise ArtifactError(f"{path} is not a tensorpress artifact (no {MANIFEST}); recompile it.")
            manifest = json.loads(zf.read(MANIFEST))
            if not isinstance(manifest, dict):
                raise ArtifactError(f"{path}: its manifest is not a JSON object; recompile the artifact.")
            offsets = {name: (_data_offset(path, info), info.file_size) for name, info in infos.items()}
            for info in infos.values():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ArtifactError(f"{path}: member {info.filename} is compressed; recompile the artifact.")
    except zipfile.BadZipFile as err:
        raise ArtifactError(
            f"{path} is truncated or not a tensorpress artifact ({err}); copy it again or recompile it."
        ) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: its manifest is corrupt; recompile the artifact.") from err
    if manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path} is not a tensorpress artifact (manifest format {manifest.get('format')!r}).")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has artifact format version {manifest.get('format_version')}, this runtime reads version "
            f"{FORMAT_VERSION}; recompile it with this tensorpress."
        )
    artifact = ArtifactFile(path, manifest, offsets)
    _check_parts_table(manifest, offsets, path)
    for member, expected in manifest["parts"].items():
        if member not in offsets:
            raise ArtifactError(f"{path} lacks its {member}; the file is incomplete, recompile it.")
        offset, size = offsets[member]
        if size != expected["bytes"] or offset + size > path.stat().st_size:
            raise ArtifactError(f"{path}: {member} is truncated; copy the artifact again or recompile it.")
        if verify and sha256_of(path, offset, size) != expected["sha256"]:
            raise ArtifactError(
                f"{path}: {member} fails its sha256 check (the file is corrupt); copy it again or recompile it."
            )
    return artifact


def _check_parts_table(manifest: dict[str, Any], members: dict[str, Any], path: Path) -> None:
    """The parts table lists, with a size and sha256 each, the library, the weights and every other
    member of the zip: without it nothing could be verified, so an artifact lacking it is refused."""
    parts = manifest.get("parts")
    if not isinstance(parts, dict):
        raise ArtifactError(
            f"{path}: its manifest has no parts table (the size and sha256 of each part), so it cannot be "
            "verified; recompile the artifact."
        )
    for member in (LIBRARY, WEIGHTS):
        if member not in parts:
            raise ArtifactError(f"{path}: its manifest's parts table lacks {member}; recompile the artifact.")
    for member, entry in parts.items():
        size = entry.get("bytes") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or not _is_sha256(digest):
            raise ArtifactError(
                f"{path}: its manifest gives no valid size and sha256 for {member}; recompile the artifact."
            )
    unlisted = sorted(name for name in members if name != MANIFEST and name not in parts and not name.endswith("/"))
    if unlisted:
        raise ArtifactError(f"{path} holds {unlisted[0]}, which its manifest does not list; recompile the artifact.")


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header (30 bytes + name + extra field)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise ArtifactError(f"{path} is corrupt (bad zip header for {info.filename}); recompile it.")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_safetensors(path: Path, offset: int = 0, size: int | None = None) -> dict[str, np.ndarray]:
    """Parse a safetensors blob (8-byte little-endian header length, JSON header, raw data) zero-copy.

    BF16 tensors (Hugging Face checkpoints; numpy has no bfloat16) are widened to float32, exactly: a
    bf16 is the upper half of an IEEE float32. Raises ValueError for an unreadable header or dtype.
    """
    with open(path, "rb") as f:
        f.seek(offset)
        try:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        except (struct.error, ValueError, MemoryError, OverflowError) as err:
            raise ValueError(f"not a readable safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise ValueError("not a readable safetensors file (its header is not a JSON object)")
    data_start = offset + 8 + header_len
    header.pop("__metadata__", None)
    arrays = {}
    for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = entry["data_offsets"]
        kind = entry["dtype"]
        if kind != "BF16" and kind not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name} has dtype {kind}, which tensorpress cannot read")
        dtype = np.dtype(np.uint16 if kind == "BF16" else SAFETENSORS_DTYPES[kind])
        shape = tuple(entry["shape"])
        if end - begin != dtype.itemsize * math.prod(shape):
            raise ValueError(f"tensor {name} declares shape {list(shape)} over {end - begin} bytes")
        if end - begin == 0:
            array = np.zeros(shape, dtype)
        else:
            array = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)
        arrays[name] = (array.astype(np.uint32) << 16).view(np.float32) if kind == "BF16" else array
    return arrays
