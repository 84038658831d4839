"""`tensorpress tune --import-kit RESULTS --log tuning_logs/sm_90a`: the records a GPU timed, appended to a log.

The kit's tuning part (benchmarks/kit/tuning_run.py) writes tuning_<device>_<time>.json whose "rows" are
record lines (records.py) with the device run's id and the row's number. Import reads every such file
(RESULTS is the file or the folder the device's output landed in) and appends each valid row that the log
does not hold yet, one fsynced line at a time (records.append_record): a killed import leaves whole lines,
and run again it appends only what is missing. A row is skipped, and all skipped rows are named in one
warning, when it is not a record (corrupt, another schema), not a Tensor Core record for a CUDA arch,
for another arch than the log's (a log folder named for an arch: tuning_logs/sm_90a) or timed on a CPU
(a dry kit) for such a log, or keyed for
another TVM or tensorpress version than this compiler (a compile here would never match it).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorpress.errors import ConfigError

RESULTS_GLOB = "tuning_*.json"
_RECORD_FIELDS = ("schema", "type", "key", "config", "seconds")  # append_record writes these itself


@dataclass
class ImportReport:
    """What an import did: rows appended, rows already in the log, rows skipped (with the reasons)."""

    log_dir: Path
    files: list[Path] = field(default_factory=list)
    appended: int = 0
    present: int = 0
    skipped: list[str] = field(default_factory=list)
    best: int = 0  # finished kernels among the appended rows
    points: list[dict[str, Any]] = field(default_factory=list)  # the device's per-point summaries, as written


def import_kit_results(results: str | os.PathLike, log: str | os.PathLike) -> ImportReport:
    """Append the device's tuning rows under `results` (a tuning_*.json, or a folder holding some) to
    the log folder `log` (module docstring); ConfigError when there is nothing to import."""
    from tensorpress.compiler.build import compiler_versions
    from tensorpress.compiler.targets import CUDA_ARCHS
    from tensorpress.compiler.tuning.records import append_record, read_records, record_problem
    from tensorpress.schedules.template_config import TENSORCORE_WEIGHT_GEMM

    source, log_dir = Path(results), Path(log)
    if source.is_dir():
        files = sorted(source.glob(RESULTS_GLOB))
    elif source.is_file():
        files = [source]
    else:
        raise ConfigError(f"kit results {source} do not exist; give the folder the device's output was copied to.")
    if not files:
        raise ConfigError(f"{source} holds no {RESULTS_GLOB} file; run the kit's tuning part (run.py --only tune).")
    if log_dir.exists() and not log_dir.is_dir():
        raise ConfigError(f"the tuning log {log_dir} is a file; give a folder (the log is <folder>/templates.jsonl).")
    versions = compiler_versions()
    log_arch = log_dir.name if log_dir.name in CUDA_ARCHS else None
    report = ImportReport(log_dir, files)
    done = {_row_id(r.fields) for r in read_records([log_dir])} - {None}
    for path in files:
        rows, points, problem = _rows(path)
        if problem:
            report.skipped.append(problem)
            continue
        report.points += points
        for number, row in enumerate(rows):
            where = f"{path.name} row {number}"
            problem = record_problem(row)
            key = row.get("key") if isinstance(row, dict) else None
            if problem is None and isinstance(key, dict):
                if key.get("template") != TENSORCORE_WEIGHT_GEMM or key.get("arch") not in CUDA_ARCHS:
                    problem = "not a Tensor Core record for a CUDA architecture"
                elif log_arch is not None and row.get("dry"):
                    problem = f"timed on a CPU (a dry kit), not fit for the {log_arch} log"
                elif log_arch is not None and key["arch"] != log_arch:
                    problem = f"timed for {key['arch']}, not for this log's {log_arch}"
                elif (key.get("tvm"), key.get("tensorpress")) != (versions["tvm"], versions["tensorpress"]):
                    problem = f"keyed for TVM {key.get('tvm')}, tensorpress {key.get('tensorpress')}: another compiler"
            if problem is not None:
                report.skipped.append(f"{where}: {problem}")
                continue
            if _row_id(row) in done:
                report.present += 1
                continue
            seconds = math.inf if row["seconds"] is None else float(row["seconds"])
            extra = {name: value for name, value in row.items() if name not in _RECORD_FIELDS}
            append_record(log_dir, row["type"], key, row["config"], seconds, **extra)
            done.add(_row_id(row))
            report.appended += 1
            report.best += row["type"] == "best"
    if report.skipped:
        first = report.skipped[0]
        more = f" (and {len(report.skipped) - 1} more)" if len(report.skipped) > 1 else ""
        warnings.warn(f"{len(report.skipped)} kit rows not imported: {first}{more}.", stacklevel=2)
    return report


def _rows(path: Path) -> tuple[list[Any], list[dict[str, Any]], str | None]:
    """The "rows" and "points" of a results file, or why it has none."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError):
        return [], [], f"{path.name}: not a JSON results file (corrupt or cut short)"
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        return [], [], f"{path.name}: no list of rows (not a tuning part's results)"
    points = data.get("points")
    return rows, [p for p in points if isinstance(p, dict)] if isinstance(points, list) else [], None


def points_table(points: list[dict[str, Any]]) -> str:
    """Per point (kernel at a token count): default and best time, speedup, candidates timed, and the
    device seconds until a trial reached 95 % of the best (the issue's tuning-time figure)."""

    def ms(value: Any) -> str:
        return f"{value * 1e3:.4f}" if isinstance(value, (int, float)) else "failed"

    lines = [f"{'kernel':<24} {'N':>4} {'default ms':>11} {'best ms':>10} {'speedup':>7} {'timed':>5} {'95% s':>6}"]
    for p in points:
        speedup = p.get("speedup")
        to_95 = p.get("seconds_to_95")
        lines.append(
            f"{str(p.get('kernel'))[:24]:<24} {p.get('tokens')!s:>4} {ms(p.get('default_seconds')):>11} "
            f"{ms(p.get('best_seconds')):>10} {f'{speedup:.2f}x' if speedup else '-':>7} {p.get('timed')!s:>5} "
            f"{'-' if to_95 is None else f'{to_95:.1f}':>6}"
        )
    return "\n".join(lines)


def _row_id(fields: Any) -> tuple[str, int] | None:
    """(device run id, row number) of a kit row, None for records written here."""
    if isinstance(fields, dict) and isinstance(fields.get("run"), str) and isinstance(fields.get("row"), int):
        return fields["run"], fields["row"]
    return None
