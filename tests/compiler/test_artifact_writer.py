"""Artifacts are reproducible byte for byte: no clock in the manifest or in the zip headers unless the
build gives one (SOURCE_DATE_EPOCH) or the user asks (record_time)."""

from __future__ import annotations

import calendar
import hashlib
import json
import time
import zipfile

import numpy as np
import pytest

from tensorpress.compiler.artifact_writer import write_artifact
from tensorpress.errors import ConfigError
from tensorpress.runtime.artifact import open_artifact


def write(tmp_path, name: str, **kwargs) -> bytes:
    library = tmp_path / "library.so"
    library.write_bytes(bytes(range(256)) * 40)
    (tmp_path / "tokenizer.json").write_text('{"model": {}}')
    params = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.float16)}
    manifest = {"kind": "graph", "target": {"kind": "cpu", "arch": None}}
    path = tmp_path / name
    write_artifact(
        path, library, params, manifest, extra_files={"tokenizer.json": tmp_path / "tokenizer.json"}, **kwargs
    )
    open_artifact(path)  # a valid artifact, every part's sha256 checked
    return path.read_bytes()


def zip_dates(data_path) -> set[tuple]:
    with zipfile.ZipFile(data_path) as zf:
        return {info.date_time for info in zf.infolist()}


def manifest_of(path) -> dict:
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read("manifest.json"))


def test_the_same_input_gives_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    first = write(tmp_path, "a.tpk")
    time.sleep(2.1)  # zip dates have a 2-second resolution: a clock in them would show now
    second = write(tmp_path, "b.tpk")
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()
    assert zip_dates(tmp_path / "a.tpk") == {(1980, 1, 1, 0, 0, 0)}
    assert manifest_of(tmp_path / "a.tpk")["created"] is None


def test_source_date_epoch_is_the_time_recorded(tmp_path, monkeypatch):
    epoch = calendar.timegm((2024, 5, 17, 12, 30, 44, 0, 0, 0))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(epoch))
    first = write(tmp_path, "a.tpk")
    second = write(tmp_path, "b.tpk", record_time=True)  # the build's declared time wins over the clock
    assert first == second
    assert zip_dates(tmp_path / "a.tpk") == {(2024, 5, 17, 12, 30, 44)}
    assert manifest_of(tmp_path / "a.tpk")["created"] == "2024-05-17T12:30:44Z"


def test_record_time_writes_the_clock(tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    before = time.time()
    write(tmp_path, "a.tpk", record_time=True)
    created = calendar.timegm(time.strptime(manifest_of(tmp_path / "a.tpk")["created"], "%Y-%m-%dT%H:%M:%SZ"))
    assert int(before) <= created <= time.time()
    (date,) = zip_dates(tmp_path / "a.tpk")
    assert abs(calendar.timegm((*date, 0, 0, 0)) - created) <= 2


def test_a_malformed_source_date_epoch_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ConfigError, match=r"SOURCE_DATE_EPOCH='yesterday' must be whole seconds since 1970"):
        write(tmp_path, "a.tpk")
    assert not (tmp_path / "a.tpk").exists()
