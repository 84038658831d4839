"""The meta_schedule records of the generic ops: where they live in a tuning log, how a build applies them.

    <log dir>/meta_schedule/database_workload.json        TVM's JSONDatabase: one line per workload
    <log dir>/meta_schedule/database_tuning_record.json   one line per measured trial, appended as measured
    <log dir>/meta_schedule/finished_ops.jsonl            one line per generic op whose search finished:
                                                          its key, best and default (rules) seconds

TVM appends a record line per trial, so a tune killed with -9 can leave a partial last line, and TVM's
reader then refuses the whole file. Tuning drops such a tail before it resumes (`open_tuning_database`);
a build never writes: it reads the whole lines that parse, skips the rest with one warning naming the
file, and keeps only the records made for its target (`load_generic_records`). A generic op with a
record gets the best recorded schedule through TVM's MetaScheduleApplyDatabase; every other function
goes to the schedule rules as before, and so does an op whose finished search found nothing faster than
the rules (the record is kept: a later, longer search starts from it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from tensorpress.errors import TuningLogError

log = logging.getLogger("tensorpress.compile")

META_SCHEDULE_DIR = "meta_schedule"
WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
FINISHED = "finished_ops.jsonl"
TEMPLATE_KERNEL_ATTR = "tensorpress.kernel"  # set on the weight-GEMM and KV kernels: our templates' own
SCHEDULED_ATTR = "tirx.is_scheduled"
MIN_GAIN = 1.03  # a record must beat the rules by 3% to replace them
FAILED_RUN_S = 1e9  # meta_schedule stores a candidate that failed to build or run as 1e10 s


def is_template_kernel(func: Any) -> bool:
    """Whether a TIR function is one of our template kernels (weight GEMM, KV append/attention), which the
    template tuner owns; every other lowered function is a generic op."""
    return func.attrs is not None and TEMPLATE_KERNEL_ATTR in func.attrs


def database_folder(log_dir: Path) -> Path:
    return Path(log_dir) / META_SCHEDULE_DIR


def normalized(func: Any) -> Any:
    """The function as meta_schedule keys it (a workload is the module {"main": func named "main"})."""
    return func.with_attr("global_symbol", "main")


def op_key(func: Any) -> str:
    """A name for a generic op that is the same in every process: the hash of its normalised TVMScript."""
    return hashlib.sha256(normalized(func).script().encode()).hexdigest()[:32]


def finished_ops(log_dir: Path) -> dict[str, dict]:
    """op key -> its finished_ops.jsonl entry (the last one); unreadable lines are skipped."""
    path = database_folder(log_dir) / FINISHED
    entries: dict[str, dict] = {}
    if not path.is_file():
        return entries
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            entry = json.loads(line)
            entries[str(entry["op"])] = entry
    return entries


def slower_than_default(entry: dict) -> bool:
    """Whether a finished search found nothing at least MIN_GAIN faster than the rules (both measured
    alike, once each: a smaller gain is within the noise of a shared machine)."""
    best, default = entry.get("best_s"), entry.get("default_s")
    return best is None or (default is not None and best * MIN_GAIN >= default)


def open_tuning_database(folder: Path) -> Any:
    """TVM's JSONDatabase in `folder` (created), for appending; a partial last line left by a killed tune
    is cut off first (it is a trial that never finished being written)."""
    from tvm.s_tir import meta_schedule as ms

    folder.mkdir(parents=True, exist_ok=True)
    for name in (WORKLOADS, RECORDS):
        _drop_partial_last_line(folder / name)
    try:
        return ms.database.JSONDatabase(path_workload=str(folder / WORKLOADS), path_tuning_record=str(folder / RECORDS))
    except Exception as err:  # noqa: BLE001 - TVM raises a bare RuntimeError from its JSON parser
        raise TuningLogError(
            f"the meta_schedule log in {folder} is corrupt ({str(err).splitlines()[0] if str(err) else err!r}); "
            "move that folder away to start the generic ops' search over."
        ) from err


def load_generic_records(log_dir: Path | None, target: Any) -> Any | None:
    """The records of `log_dir/meta_schedule` made for `target` (kind and mcpu or arch alike) in a TVM
    in-memory database, or None when there are none. Unreadable lines are skipped and an unreadable
    database is ignored, each with one warning naming the file; this never raises."""
    if log_dir is None:
        return None
    folder = database_folder(log_dir)
    if not (folder / WORKLOADS).is_file() or not (folder / RECORDS).is_file():
        return None
    from tvm.s_tir import meta_schedule as ms

    with tempfile.TemporaryDirectory(prefix="tensorpress-ms-records-") as tmp:
        for name in (WORKLOADS, RECORDS):
            _copy_whole_json_lines(folder / name, Path(tmp) / name)
        try:
            disk = ms.database.JSONDatabase(
                path_workload=str(Path(tmp) / WORKLOADS), path_tuning_record=str(Path(tmp) / RECORDS)
            )
            records = disk.get_all_tuning_records()
        except Exception as err:  # noqa: BLE001 - a log we cannot read must never stop a compile
            log.warning(
                "the meta_schedule records in %s cannot be read (%s); the generic ops keep their default schedules",
                folder / RECORDS,
                str(err).splitlines()[0] if str(err) else type(err).__name__,
            )
            return None
    memory = ms.database.MemoryDatabase()
    kept = 0
    for record in records:
        if not _same_target(record.target, target) or not _measured(record):
            continue
        workload = memory.commit_workload(record.workload.mod)
        memory.commit_tuning_record(
            ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target, record.args_info)
        )
        kept += 1
    return memory if kept else None


def apply_generic_records(mod: Any, target: Any, log_dir: Path | None) -> tuple[Any, list[str]]:
    """Give each generic op of the lowered `mod` that has a record in `log_dir` its best tuned schedule.

    mod: the IRModule after Relax lowering (`build.relax_lowering`), before the schedule rules. Returns
    the module (tuned functions marked tirx.is_scheduled, so the rules leave them alone) and the names of
    the functions whose schedule came from the log, sorted. Template kernels are never touched.
    """
    database = load_generic_records(log_dir, target)
    if database is None:
        return mod, []
    import tvm
    from tvm import relax

    not_faster = {key for key, entry in finished_ops(Path(log_dir or ".")).items() if slower_than_default(entry)}
    generic = {
        gv: func
        for gv, func in mod.functions_items()
        if isinstance(func, tvm.tirx.PrimFunc)
        and not is_template_kernel(func)
        and not _scheduled(func)
        and (not not_faster or op_key(func) not in not_faster)
    }
    if not generic:
        return mod, []
    try:
        with target, database:
            applied = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(tvm.IRModule(generic))
    except Exception as err:  # noqa: BLE001 - a record that does not replay means default schedules, not a crash
        log.warning(
            "the meta_schedule records in %s do not apply (%s); the generic ops keep their default schedules",
            database_folder(Path(log_dir or ".")) / RECORDS,
            str(err).splitlines()[0] if str(err) else type(err).__name__,
        )
        return mod, []
    tuned = []
    mod = mod.clone()  # the caller's module stays as it was
    for gv, original in generic.items():
        func = applied[gv]
        if not _scheduled(func):
            continue
        # the record was made on the function named "main"; it keeps the symbol it had here
        symbol = original.attrs.get("global_symbol") if original.attrs is not None else None
        func = func.with_attr("global_symbol", symbol) if symbol is not None else func.without_attr("global_symbol")
        mod[gv] = func
        tuned.append(gv.name_hint)
    return mod, sorted(tuned)


def _scheduled(func: Any) -> bool:
    return func.attrs is not None and SCHEDULED_ATTR in func.attrs and bool(func.attrs[SCHEDULED_ATTR])


def _same_target(recorded: Any, target: Any) -> bool:
    if recorded is None or recorded.kind.name != target.kind.name:
        return False
    return all(str(recorded.attrs.get(key, "")) == str(target.attrs.get(key, "")) for key in ("mcpu", "arch"))


def _measured(record: Any) -> bool:
    run_secs = record.run_secs
    return run_secs is not None and len(run_secs) > 0 and min(float(s) for s in run_secs) < FAILED_RUN_S


def _copy_whole_json_lines(source: Path, destination: Path) -> None:
    """Copy the lines of `source` that are whole JSON values; warn once, naming the file, if any is not."""
    good, bad = [], 0
    with open(source, "rb") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                json.loads(line)
            except ValueError:
                bad += 1
                continue
            good.append(line if line.endswith(b"\n") else line + b"\n")
    if bad:
        log.warning("skipped %d unreadable line(s) of the meta_schedule log %s", bad, source)
    destination.write_bytes(b"".join(good))


def _drop_partial_last_line(path: Path) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as file:
        data = file.read()
        if data.endswith(b"\n"):
            return
        file.truncate(data.rfind(b"\n") + 1)
        file.flush()
        os.fsync(file.fileno())
