"""The artifact file: written atomically, read back exactly, and refused in one sentence when damaged."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import safetensors.numpy

from tensorpress.compiler.artifact_writer import write_artifact
from tensorpress.errors import ArtifactError
from tensorpress.runtime.artifact import WEIGHTS, open_artifact
from tensorpress.runtime.atomic_file import atomic_output


@pytest.fixture
def params():
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((4, 8)).astype(np.float32),
        "a.codes": rng.integers(0, 2**32, (3, 5), dtype=np.uint32),
        "b.scale": rng.standard_normal(7).astype(np.float16),
        "empty": np.zeros((0, 3), np.float32),
    }


@pytest.fixture
def artifact(tmp_path, params):
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    path = tmp_path / "m.tpk"
    write_artifact(path, lib, params, {"kind": "graph", "target": {"kind": "cpu", "arch": None}})
    return path


def test_weights_round_trip_and_are_readable_by_the_safetensors_library(artifact, params):
    opened = open_artifact(artifact)
    got = opened.weights()
    assert list(got) == list(params)  # file order = parameter order
    for name, value in params.items():
        np.testing.assert_array_equal(got[name], value)
        assert got[name].dtype == value.dtype
    reference = safetensors.numpy.load(opened.read_member(WEIGHTS))  # the independent reader
    for name, value in params.items():
        np.testing.assert_array_equal(reference[name], value)


def test_truncated_artifact_is_refused(artifact):
    data = artifact.read_bytes()
    artifact.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated|incomplete"):
        open_artifact(artifact)


def test_flipped_byte_fails_the_checksum(artifact):
    opened = open_artifact(artifact)
    offset, size = opened.offsets[WEIGHTS]
    data = bytearray(artifact.read_bytes())
    data[offset + size - 3] ^= 0xFF
    artifact.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"weights.safetensors fails its sha256 check"):
        open_artifact(artifact)


def test_other_format_version_is_refused(artifact, tmp_path):
    with zipfile.ZipFile(artifact) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    manifest = json.loads(members["manifest.json"])
    manifest["format_version"] = 999
    members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(artifact, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(ArtifactError, match="format version 999.*recompile"):
        open_artifact(artifact)


def test_not_a_zip_is_refused(tmp_path):
    path = tmp_path / "x.tpk"
    path.write_text("hello")
    with pytest.raises(ArtifactError, match="truncated or not a tensorpress artifact"):
        open_artifact(path)


def test_missing_artifact_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        open_artifact(tmp_path / "nope.tpk")


def test_atomic_output_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "out.bin") as f:
        f.write(b"half of it")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_replaces_whole(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_output(target) as f:
        f.write(b"new content")
    assert target.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_extra_files_are_packed_and_checked(tmp_path, params):
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"\x7fELF")
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"model": "bpe"}')
    path = tmp_path / "m.tpk"
    write_artifact(path, lib, params, {"kind": "decoder"}, extra_files={"tokenizer.json": tokenizer})
    tokenizer.unlink()  # the artifact must not need the original any more
    opened = open_artifact(path)
    assert opened.read_file("tokenizer.json") == b'{"model": "bpe"}'
    assert "files/tokenizer.json" in opened.manifest["parts"]
    with pytest.raises(KeyError):
        opened.read_file("vocab.txt")


def _rewrite_manifest(artifact, change) -> None:
    """Rewrite the artifact's manifest.json through `change(manifest) -> new manifest` (a crafted file)."""
    with zipfile.ZipFile(artifact) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    members["manifest.json"] = json.dumps(change(json.loads(members["manifest.json"]))).encode()
    with zipfile.ZipFile(artifact, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _without_parts(manifest):
    manifest.pop("parts")
    return manifest


def _part(member, **entry):
    def change(manifest):
        manifest["parts"][member] = entry
        return manifest

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: [m], "its manifest is not a JSON object"),
        (_without_parts, "has no parts table .* so it cannot be verified"),
        (lambda m: {**m, "parts": [1, 2]}, "has no parts table"),
        (_part("weights.safetensors", sha256="0" * 64), "no valid size and sha256 for weights.safetensors"),
        (_part("library.so", bytes=5), "no valid size and sha256 for library.so"),
        (_part("library.so", bytes=True, sha256="0" * 64), "no valid size and sha256 for library.so"),
        (lambda m: {**m, "parts": {"library.so": m["parts"]["library.so"]}}, "parts table lacks weights"),
    ],
)
def test_a_crafted_parts_table_is_refused_in_one_sentence(artifact, change, message):
    _rewrite_manifest(artifact, change)
    for verify in (True, False):  # never loaded without its checks
        with pytest.raises(ArtifactError, match=message) as err:
            open_artifact(artifact, verify=verify)
        assert "\n" not in str(err.value)


def test_a_member_the_parts_table_does_not_list_is_refused(artifact):
    with zipfile.ZipFile(artifact, "a", zipfile.ZIP_STORED) as zf:
        zf.writestr("files/extra.bin", b"smuggled")
    with pytest.raises(ArtifactError, match="holds files/extra.bin, which its manifest does not list"):
        open_artifact(artifact)


def test_a_directory_is_said_to_be_a_directory(tmp_path):
    with pytest.raises(ArtifactError, match="is a directory, not an artifact"):
        open_artifact(tmp_path)
