"""`tune --import-kit`: a GPU kit's rows appended to a log as records, append-only and resumable (an
import that dies mid-way, run again, leaves every row exactly once); foreign and corrupt rows are one
warning, never a crash, and an import with nothing valid writes nothing."""

from __future__ import annotations

import json
import warnings

import pytest

from tensorpress.compiler.tuning import records
from tensorpress.compiler.tuning.kit_import import import_kit_results
from tensorpress.compiler.tuning.records import RECORDS_FILE, SCHEMA, RecordLookup, key_text, read_records
from tensorpress.compiler.tuning.tuning_kit import point_kernels

CONFIGS = [
    {"block_n": 16, "block_m": 128, "block_k": 64, "warps": 4, "stages": 4, "split_k": 1},
    {"block_n": 16, "block_m": 64, "block_k": 128, "warps": 4, "stages": 3, "split_k": 2},
]


def _rows(arch="sm_90a", run="r1"):
    """What the kit's tuning part writes for e3m2 4096x4096 at N = 1 and 16: two trials and a best each."""
    (kernel,) = point_kernels([("e3m2", 4096, 4096)], (1, 16), arch)
    rows = []
    for _, key in kernel.points:
        for config, seconds in zip(CONFIGS, (2e-5, 1.5e-5)):
            rows.append({"schema": SCHEMA, "type": "trial", "key": key, "config": config, "seconds": seconds})
        rows.append({"schema": SCHEMA, "type": "best", "key": key, "config": CONFIGS[1], "seconds": 1.5e-5,
                     "default_seconds": 2e-5, "trials": 2})  # fmt: skip
    return [{**row, "run": run, "row": i, "source": "gpu-kit"} for i, row in enumerate(rows)]


def _write(path, rows):
    path.write_text(json.dumps({"run": "r1", "rows": rows}))
    return path


def test_an_import_that_dies_midway_completes_on_rerun_without_duplicates(tmp_path, monkeypatch):
    rows = _rows()
    results = _write(tmp_path / "tuning_h100_1.json", rows)
    log = tmp_path / "sm_90a"
    calls = []  # the import takes append_record from the records module when it runs: patch it there
    original = records.append_record

    def dying(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is stopped after three whole lines
        calls.append(args)
        original(*args, **kwargs)

    monkeypatch.setattr(records, "append_record", dying)
    with pytest.raises(KeyboardInterrupt):
        import_kit_results(results, log)
    assert len((log / RECORDS_FILE).read_text().splitlines()) == 3
    monkeypatch.setattr(records, "append_record", original)
    report = import_kit_results(results, log)
    assert (report.appended, report.present, report.skipped) == (3, 3, [])
    lines = [json.loads(line) for line in (log / RECORDS_FILE).read_text().splitlines()]
    assert [(r["type"], r["config"], r["seconds"], r["row"]) for r in lines] == [
        (r["type"], r["config"], r["seconds"], r["row"]) for r in rows
    ]
    # compile's lookup finds the imported best for both keys
    (kernel,) = point_kernels([("e3m2", 4096, 4096)], (1, 16), "sm_90a")
    lookup = RecordLookup([log], _target("sm_90a"))
    assert [lookup.best[key_text(key)].config for _, key in kernel.points] == [CONFIGS[1], CONFIGS[1]]


def _target(arch):
    from tensorpress.compiler.targets import TargetSpec

    return TargetSpec("cuda", arch)


def test_foreign_and_corrupt_rows_are_one_warning_and_the_rest_import(tmp_path):
    good = _rows()
    foreign = [
        {"schema": "someone-else/2", "type": "trial"},
        {**good[0], "key": {**good[0]["key"], "arch": "sm_80"}, "row": 100},  # another arch than the log's
        {**good[0], "key": {**good[0]["key"], "tvm": "0.19.0"}, "row": 101},  # another compiler
        {**good[0], "key": {**good[0]["key"], "template": "cpu-weight-gemm"}, "row": 102},
        {**good[0], "seconds": -1.0, "row": 103},
        {**good[0], "dry": True, "row": 104},  # CPU-timed, for an arch's log
        "not a row",
    ]
    (tmp_path / "results").mkdir()
    _write(tmp_path / "results" / "tuning_a.json", good + foreign)
    (tmp_path / "results" / "tuning_b.json").write_text('{"rows": [')  # cut short
    log = tmp_path / "sm_90a"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = import_kit_results(tmp_path / "results", log)
    assert len(caught) == 1 and "8 kit rows not imported" in str(caught[0].message)
    assert report.appended == len(good) and report.best == 2
    assert len(read_records([log])) == len(good)


def test_an_import_with_nothing_valid_writes_nothing(tmp_path):
    results = _write(tmp_path / "tuning_x.json", _rows(arch="sm_80"))
    with pytest.warns(UserWarning, match="6 kit rows not imported"):
        report = import_kit_results(results, tmp_path / "sm_90a")
    assert report.appended == 0 and not (tmp_path / "sm_90a").exists()
