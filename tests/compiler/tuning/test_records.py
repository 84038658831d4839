"""Tuning records: appended whole, read back, bad lines skipped with one warning each (file and line named),
and the best record per kernel handed to the schedule rules, the user's log before the committed one."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from tensorpress.compiler.formats import decode_stage
from tensorpress.compiler.targets import TargetSpec
from tensorpress.compiler.tuning.records import (
    RECORDS_FILE,
    SCHEMA,
    RecordLookup,
    append_record,
    arch_label,
    kernel_key,
    read_records,
)
from tensorpress.schedules.template_config import CPU_WEIGHT_GEMM, kernel_signature
from tensorpress.schedules.weight_gemm import N_HINT_ATTR, make_weight_gemm

CPU = TargetSpec("cpu")


def _func(m=64, k=32, n_hint=16, fmt="dense-fp32-panel"):
    func = make_weight_gemm(decode_stage(fmt), m, k, "float32", "float32", with_bias=True)
    return func.with_attr(N_HINT_ATTR, n_hint)


def _key(func):
    return kernel_key(kernel_signature(func), CPU_WEIGHT_GEMM, CPU)


def _config(rows):
    return {"schedule": "panel", "token_tile": rows, "weight_tile": 16}


def test_the_key_names_kernel_format_shapes_tokens_dtype_arch_and_versions():
    key = _key(_func(fmt="fp6"))
    assert key["kind"] == "weight_gemm" and key["template"] == CPU_WEIGHT_GEMM
    assert key["format"]["name"] == "e3m2" and [b[0] for b in key["format"]["buffers"]][-1] == "scales"
    assert (key["m"], key["k"], key["n"], key["act_dtype"]) == (64, 32, 16, "float32")
    assert key["arch"] == "cpu-x86-64-v3" == arch_label(CPU) and arch_label(TargetSpec("cuda", "sm_90a")) == "sm_90a"
    assert key["tvm"].startswith("0.27") and key["tensorpress"]
    assert _key(_func(n_hint=1)) != _key(_func(n_hint=16)) != _key(_func(m=48))


def test_records_round_trip_and_failed_trials_read_as_inf(tmp_path):
    key = _key(_func())
    append_record(tmp_path, "trial", key, _config(6), 2e-5, elapsed=0.5)
    append_record(tmp_path, "trial", key, _config(3), math.inf, elapsed=0.9)
    append_record(tmp_path, "best", key, _config(6), 2e-5, default_seconds=2e-5, trials=2)
    trial, failed, best = read_records([tmp_path])
    assert (trial.type, trial.config, trial.seconds, trial.fields["elapsed"]) == ("trial", _config(6), 2e-5, 0.5)
    assert (
        failed.seconds == math.inf
        and json.loads((tmp_path / RECORDS_FILE).read_text().splitlines()[1])["seconds"] is None
    )
    assert best.type == "best" and best.line == 3 and best.path == tmp_path / RECORDS_FILE


def test_corrupt_truncated_and_foreign_lines_are_skipped_with_one_warning_each(tmp_path):
    key = _key(_func())
    append_record(tmp_path, "best", key, _config(3), 1e-5)
    log = tmp_path / RECORDS_FILE
    good = log.read_text()
    foreign = json.dumps({"input": "llvm", "result": [[0.1]], "version": 0.2})  # a TVM autotvm line
    wrong_schema = json.dumps({"schema": "tensorpress-tuning/9", "type": "best"})
    bad_time = json.dumps({"schema": SCHEMA, "type": "best", "key": key, "config": {}, "seconds": -1})
    log.write_text(good + "{not json\n" + foreign + "\n" + wrong_schema + "\n" + bad_time + "\n" + good[:40])
    with pytest.warns(UserWarning) as caught:
        records = read_records([tmp_path])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 5
    for line, words in [(2, "not a JSON record"), (3, "not a tensorpress-tuning/1"), (4, "not a tensorpress")]:
        assert any(m.startswith(f"{log}, line {line}: {words}") for m in messages), messages
    assert any(f"{log}, line 5: its time -1" in m for m in messages)
    assert any(f"{log}, line 6: not a JSON record (cut short)" in m for m in messages)
    assert [r.line for r in records] == [1]
    # the next record is appended on a line of its own after the cut one, and reads back
    append_record(tmp_path, "trial", key, _config(2), 3e-5)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert [r.config for r in read_records([tmp_path])][-1] == _config(2)


def test_the_lookup_gives_the_fastest_best_record_and_the_first_log_wins(tmp_path):
    func = _func()
    mine, committed = tmp_path / "mine", tmp_path / "committed"
    append_record(committed, "best", _key(func), _config(1), 1e-6)
    append_record(mine, "trial", _key(func), _config(2), 1e-7)  # trials are never applied
    append_record(mine, "best", _key(func), _config(5), 4e-5)
    append_record(mine, "best", _key(func), _config(3), 3e-5)
    append_record(mine, "best", _key(_func(m=48)), _config(4), 1e-5)  # another kernel
    lookup = RecordLookup([mine, committed, tmp_path / "absent"], CPU)
    config, origin = lookup.tuned(func, CPU_WEIGHT_GEMM)
    assert config == _config(3) and origin.endswith("mine/templates.jsonl")
    assert RecordLookup([committed], CPU).tuned(func, CPU_WEIGHT_GEMM)[0] == _config(1)
    assert lookup.tuned(_func(n_hint=1), CPU_WEIGHT_GEMM) is None
    assert lookup.tuned(func, "tensorcore-weight-gemm") is None
