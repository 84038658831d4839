"""Tuning records: one JSON line per measured trial, one per finished kernel, in `<log dir>/templates.jsonl`.

    {"schema": "tensorpress-tuning/1", "type": "trial", "key": KEY, "config": {...}, "seconds": 1.2e-4,
     "elapsed": 3.1}                                  a measured candidate (seconds null: it failed)
    {"schema": "tensorpress-tuning/1", "type": "best", "key": KEY, "config": {...}, "seconds": 1.1e-4,
     "default_seconds": 1.9e-4, "trials": 32, "elapsed": 41.0}        the kernel is finished

    KEY = {"template", "kind", "format": {"name", "buffers"}, "m", "k", "n", "act_dtype", "arch",
           "tvm", "tensorpress"}          (`kernel_key`; n: the token count measured)

A line is appended whole (one write, flushed and fsynced) or not at all, so a tune killed at any point
leaves every finished trial and kernel readable. Reading skips, with one warning naming the file and
line, a line that is not JSON (corrupt, or cut short by a kill), or not a record of this schema
(foreign); it never raises. `RecordLookup` is the `ConfigLookup` a compile gives the schedule rules:
the best finished record for each kernel, the rules validate it before use.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorpress.compiler.targets import TargetSpec

SCHEMA = "tensorpress-tuning/1"
RECORDS_FILE = "templates.jsonl"
REPO_ROOT = Path(__file__).resolve().parents[2]
_KEY_FIELDS = ("template", "kind", "format", "m", "k", "n", "act_dtype", "arch", "tvm", "tensorpress")


def arch_label(target: TargetSpec) -> str:
    """The architecture records are kept under: `cpu-x86-64-v3` (the CPU's x86-64 level), `sm_90a`, ..."""
    return f"cpu-{target.mcpu}" if target.kind == "cpu" else str(target.arch)


def default_log_dir(target: TargetSpec) -> Path:
    """The committed logs of `target`'s arch: tuning_logs/<arch>/ of the repository."""
    return REPO_ROOT / "tuning_logs" / arch_label(target)


def kernel_key(signature: dict[str, Any], template: str, target: TargetSpec) -> dict[str, Any]:
    """The record key of a kernel: its signature (`schedules.template_config.kernel_signature`), the
    template, the target's arch and the TVM and tensorpress versions."""
    from tensorpress.compiler.build import compiler_versions

    versions = compiler_versions()
    key = {"template": template, **signature, "arch": arch_label(target)}
    key.update(tvm=versions["tvm"], tensorpress=versions["tensorpress"])
    return {name: key[name] for name in _KEY_FIELDS}


def key_text(key: dict[str, Any]) -> str:
    """A canonical string of a key (records match when these are equal)."""
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Record:
    """One line of a log: a trial or a finished kernel ("best"), where it was read from."""

    type: str
    key: dict[str, Any]
    config: dict[str, Any]
    seconds: float  # math.inf for a failed trial
    fields: dict[str, Any]  # the whole line as read
    path: Path
    line: int


def append_record(log_dir: Path, kind: str, key: dict[str, Any], config: dict[str, Any], seconds: float, **extra):
    """Append one record line to `log_dir`/templates.jsonl: whole (one write, flush, fsync) or not at all."""
    line: dict[str, Any] = {"schema": SCHEMA, "type": kind, "key": key, "config": config}
    line["seconds"] = seconds if math.isfinite(seconds) else None
    line.update(extra)
    data = (json.dumps(line, sort_keys=True) + "\n").encode()
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / RECORDS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        _complete_last_line(fd, path)
        written = os.write(fd, data)
        if written != len(data):  # a short write (disk full): take the partial line back out
            os.ftruncate(fd, os.fstat(fd).st_size - written)
            raise OSError(f"could not append a whole record to {path} (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)


def _complete_last_line(fd: int, path: Path) -> None:
    """Start a new line if the file ends in a line cut short (a kill mid-write elsewhere): the cut line
    stays unreadable on its own instead of swallowing the record appended after it."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    with open(path, "rb") as f:
        f.seek(size - 1)
        if f.read(1) != b"\n":
            os.write(fd, b"\n")


def read_records(paths: Iterable[Path]) -> list[Record]:
    """Every valid record of the logs at `paths` (files or folders holding templates.jsonl), in order;
    one warning per bad line (file and line named), missing files skipped."""
    records: list[Record] = []
    for given in paths:
        path = given / RECORDS_FILE if given.is_dir() else given
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                record = _parse_line(raw, path, number)
                if record is not None:
                    records.append(record)
    return records


def _parse_line(raw: bytes, path: Path, number: int) -> Record | None:
    if not raw.strip():
        return None
    try:
        line = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        cut = "" if raw.endswith(b"\n") else " (cut short)"
        warnings.warn(f"{path}, line {number}: not a JSON record{cut}; skipped.", stacklevel=3)
        return None
    problem = record_problem(line)
    if problem is not None:
        warnings.warn(f"{path}, line {number}: {problem}; skipped.", stacklevel=3)
        return None
    seconds = math.inf if line["seconds"] is None else float(line["seconds"])
    return Record(line["type"], line["key"], line["config"], seconds, line, path, number)


def record_problem(line: Any) -> str | None:
    """Why a parsed line is not a record of this schema, or None."""
    if not isinstance(line, dict) or line.get("schema") != SCHEMA:
        return f"not a {SCHEMA} record"
    if line.get("type") not in ("trial", "best"):
        return f"unknown record type {line.get('type')!r}"
    key, config, seconds = line.get("key"), line.get("config"), line.get("seconds")
    if not isinstance(key, dict) or sorted(key) != sorted(_KEY_FIELDS):
        return "its key lacks fields or has unknown ones"
    if not isinstance(config, dict):
        return "its config is not an object"
    if seconds is not None and (not isinstance(seconds, (int, float)) or not seconds > 0):
        return f"its time {seconds!r} is not a positive number of seconds"
    return None


def best_records(records: Iterable[Record]) -> dict[str, Record]:
    """The fastest finished ("best") record per key text."""
    best: dict[str, Record] = {}
    for record in records:
        if record.type == "best" and math.isfinite(record.seconds):
            text = key_text(record.key)
            if text not in best or record.seconds < best[text].seconds:
                best[text] = record
    return best


class RecordLookup:
    """The best finished record per kernel key over some logs, earlier logs first (`ConfigLookup`)."""

    def __init__(self, log_paths: Sequence[Path], target: TargetSpec):
        self.target = target
        self.best: dict[str, Record] = {}
        for path in log_paths:  # an earlier log wins (the user's --tuning-log over the committed one)
            for text, record in best_records(read_records([path])).items():
                self.best.setdefault(text, record)

    def tuned(self, func, template: str) -> tuple[dict[str, Any], str] | None:
        from tensorpress.schedules.template_config import kernel_signature

        record = self.best.get(key_text(kernel_key(kernel_signature(func), template, self.target)))
        if record is None:
            return None
        return dict(record.config), shown_path(record.path)


def shown_path(path: Path) -> str:
    """`path` relative to the repository when inside it (as committed logs are named), else absolute."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path.resolve())
