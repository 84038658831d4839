"""`tensorpress.tune`: the Python face of `tensorpress tune`.

    prepared = import_for_compile(model, ...)            compile's checks and import
    kernels  = template_kernels(lowered(rewritten))      the distinct template kernels (extract_kernels.py)
    for each kernel:  search_kernel(...)                 template_search.py, records appended to the log
    tune_generic_ops(rewritten, ...)                     the generic ops by meta_schedule (generic_ops.py)
    summary tables, tuning_progress.png beside the log

Candidates are timed on this machine, or on every server of a TVM RPC tracker (`rpc_tracker`,
`rpc_key`: RpcMeasurer for the templates, meta_schedule's RPCRunner for the generic ops); they are
always built here.

For a CUDA target nothing is timed here: the model's Tensor Core kernels and their candidate tile
configs go into a tuning kit (tuning_kit.py) that the GPU kit times on a GPU (benchmarks/kit/run.py
--only tune), and `tensorpress tune --import-kit` (kit_import.py) appends what it measured to the log.

A rerun of the same command resumes: kernels finished in the log are not searched again, trials in the
log are not measured again. `time_budget` is shared by the template kernels not yet finished: each gets
an even share of what is left when its turn comes; the generic ops are searched only when time is left
after them, and a generic op once started runs its trials.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorpress.compiler.compression_configs import FPxConfig, SparseConfig
from tensorpress.compiler.targets import TargetSpec, parse_target
from tensorpress.compiler.tuning.measure import Measurer
from tensorpress.compiler.tuning.template_search import KernelResult, TemplateSpace
from tensorpress.errors import ConfigError

DEFAULT_TRIALS = 32
DEFAULT_KIT_CANDIDATES = 16  # CUDA: candidates built per kernel shape (~5 s of nvcc each here)
DEFAULT_GENERIC_OPS = 8  # the generic ops searched at most, the costliest first (generic_ops.py)
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass
class TuneReport:
    """What a tune did: the log folder, one result per kernel, the summary and the plot written."""

    log_dir: Path
    results: list[KernelResult] = field(default_factory=list)
    generic: list[Any] = field(default_factory=list)  # GenericOpResult per generic op
    summary: str = ""
    plot: Path | None = None
    kit: Path | None = None  # CUDA: the tuning kit prepared for a GPU (tuning_kit.py)
    kit_manifest: dict[str, Any] | None = None


def parse_time_budget(text: str | float | None) -> float:
    """Seconds from '10m', '90s', '1.5h' or a number of seconds; math.inf for None; ConfigError otherwise."""
    if text is None:
        return math.inf
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", str(text))
        if match is None:
            raise ConfigError(
                f"time budget {text!r} is not a duration; give a number with an optional unit, e.g. 90s, 10m or 1h."
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not seconds > 0 or not math.isfinite(seconds):
        raise ConfigError(f"time budget {text!r} must be a positive duration, e.g. 90s, 10m or 1h.")
    return seconds


def tune(
    model: Any,
    *,
    target: str = "cpu",
    dtype: str | None = None,
    weights: FPxConfig | str | None = None,
    sparsity: SparseConfig | None = None,
    skip: Sequence[str] = (),
    input_shapes: dict[str, list[int | str]] | None = None,
    trials: int | None = None,
    time_budget: str | float | None = None,
    log: str | os.PathLike | None = None,
    generic_ops: int = DEFAULT_GENERIC_OPS,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    measurer: Measurer | None = None,
    show_progress: bool = True,
    kit: str | os.PathLike | None = None,
    kit_dry: bool = False,
    **import_options: Any,
) -> TuneReport:
    """Tune the template kernels of `model` as `compile` with the same options would build them.

    model, target, dtype, weights, sparsity, skip, input_shapes: as for `tensorpress.compile`.
    trials: measured candidates per kernel at most (the default config counts as one).
    time_budget: for the whole run, '10m', '90s', '1h' or seconds (None: no limit).
    log: the log folder (default tuning_logs/<arch>/ of the repository, which `compile` reads).
    generic_ops: how many generic ops meta_schedule searches at most, `trials` each (0: none).
    rpc_tracker, rpc_key: "HOST:PORT" and key of a TVM RPC tracker whose servers time the candidates.
    measurer: how template candidates are timed (default `LocalMeasurer`, this CPU; RpcMeasurer with
    rpc_tracker).
    Returns a TuneReport; the log gets a line per trial and per finished kernel (`records.py`).

    For a CUDA target the candidates are timed on a GPU by the GPU kit: this builds a tuning kit at `kit`
    (default .tuning-kit/ of the repository; `trials` candidates per kernel, default 16; `time_budget`
    the device seconds of the whole part, default 90 s; `kit_dry`: CPU-built kernels, to prove the
    plumbing without a GPU) and returns with report.kit set; nothing is timed and no log is written.
    `tensorpress tune --import-kit` brings the device's timings back as records.
    """
    from tensorpress.compiler.api import import_for_compile
    from tensorpress.compiler.pipeline import rewrite_for_target
    from tensorpress.compiler.tuning.extract_kernels import lowered_module, template_kernels
    from tensorpress.compiler.tvm_log import tvm_log_routed

    target_spec = parse_target(target)
    budget = parse_time_budget(time_budget)
    if target_spec.kind == "cuda" and trials is None:
        trials = DEFAULT_KIT_CANDIDATES
    trials = DEFAULT_TRIALS if trials is None else trials
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ConfigError(f"trials must be a whole number of at least 1, got {trials!r}.")
    if not isinstance(generic_ops, int) or isinstance(generic_ops, bool) or generic_ops < 0:
        raise ConfigError(f"generic_ops must be a whole number of at least 0, got {generic_ops!r}.")
    if (rpc_tracker is None) != (rpc_key is None):
        raise ConfigError("--rpc-tracker HOST:PORT and --rpc-key KEY go together; give both, or neither to tune here.")
    if target_spec.kind == "cuda":
        if rpc_tracker is not None:
            raise ConfigError(
                "--rpc-tracker times CPU candidates; for --target cuda the GPU kit times them (see --kit)."
            )
        options = dict(dtype=dtype, weights=weights, sparsity=sparsity, skip=skip, input_shapes=input_shapes)
        return _prepare_cuda_kit(model, target_spec, budget, trials, kit, kit_dry, options, import_options)
    space = _template_space(target_spec)
    if rpc_tracker is None and measurer is None:
        _check_host_runs(target_spec)
    if rpc_tracker is not None and measurer is None:
        from tensorpress.compiler.tuning.rpc_measure import RpcMeasurer

        measurer = RpcMeasurer(rpc_tracker, str(rpc_key))  # an unreachable tracker is one error, before any work
    log_dir = Path(log) if log is not None else _default_log(target_spec)
    if log_dir.exists() and not log_dir.is_dir():
        raise ConfigError(f"the tuning log {log_dir} is a file; give a folder (the log is <folder>/templates.jsonl).")
    start = time.monotonic()
    with tvm_log_routed():
        prepared = import_for_compile(
            model,
            target_spec,
            dtype=dtype,
            weights=weights,
            sparsity=sparsity,
            skip=skip,
            input_shapes=input_shapes,
            **import_options,
        )
        rewritten = rewrite_for_target(prepared.imported, target_spec, prepared.recipe)
        kernels = template_kernels(lowered_module(rewritten.model.mod, target_spec), target_spec, space.template)
    report = TuneReport(log_dir)
    for index, kernel in enumerate(kernels):
        left = budget - (time.monotonic() - start)
        deadline = time.monotonic() + max(left, 0.0) / (len(kernels) - index)
        report.results.append(_search(kernel, space, target_spec, log_dir, trials, deadline, measurer, show_progress))
    if generic_ops and time.monotonic() - start < budget:
        report.generic = _tune_generic(
            rewritten.model.mod, target_spec, log_dir, trials, generic_ops, rpc_tracker, rpc_key
        )
    from tensorpress.compiler.tuning.tuning_report import PLOT_FILE, generic_summary_table, plot_progress, summary_table

    report.summary = "\n\n".join(
        table
        for table in (
            summary_table(report.results) if report.results else "",
            generic_summary_table(report.generic) if report.generic else "",
        )
        if table
    )
    report.plot = plot_progress(report.results, log_dir / PLOT_FILE) if report.results else None
    return report


def _prepare_cuda_kit(model, target, budget, candidates, kit, dry, options, import_options) -> TuneReport:
    """`tune` for a CUDA target: the model's Tensor Core kernels and their candidates in a tuning kit."""
    from tensorpress.compiler.api import import_for_compile
    from tensorpress.compiler.pipeline import rewrite_for_target
    from tensorpress.compiler.tuning.extract_kernels import lowered_module, template_kernels
    from tensorpress.compiler.tuning.records import REPO_ROOT, default_log_dir
    from tensorpress.compiler.tuning.tuning_kit import (
        DEFAULT_DEVICE_BUDGET_S,
        DEFAULT_KIT,
        DEVICE_MADE_SPARSE,
        kit_kernels,
        write_tuning_kit,
    )
    from tensorpress.compiler.tvm_log import tvm_log_routed
    from tensorpress.schedules.template_config import TENSORCORE_WEIGHT_GEMM

    folder = Path(kit) if kit is not None else REPO_ROOT / DEFAULT_KIT
    if folder.exists() and not (folder / "manifest.json").is_file():
        raise ConfigError(f"{folder} exists and is not a tuning kit; give --kit a new folder or an old kit.")
    with tvm_log_routed():
        prepared = import_for_compile(model, target, **options, **import_options)
        rewritten = rewrite_for_target(prepared.imported, target, prepared.recipe)
        lowered = lowered_module(rewritten.model.mod, target)
        kernels = template_kernels(lowered, target, TENSORCORE_WEIGHT_GEMM, data_dependent=DEVICE_MADE_SPARSE)
    report = TuneReport(default_log_dir(target))
    if not kernels:
        return report
    device_budget = DEFAULT_DEVICE_BUDGET_S if math.isinf(budget) else budget
    with tvm_log_routed():
        manifest = write_tuning_kit(folder, kit_kernels(kernels), target, candidates, device_budget, dry=dry)
    report.kit, report.kit_manifest = folder, manifest
    return report


def _search(kernel, space, target, log_dir, trials, deadline, measurer, show_progress) -> KernelResult:
    from tqdm import tqdm

    from tensorpress.compiler.tuning.template_search import search_kernel

    with tqdm(desc=kernel.name, unit="trial", file=sys.stderr, disable=not show_progress, leave=True) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        return search_kernel(kernel, space, target, log_dir, trials, deadline, measurer, progress)


def _tune_generic(mod, target, log_dir, trials, max_ops, rpc_tracker, rpc_key) -> list:
    from tensorpress.compiler.tuning.generic_ops import tune_generic_ops
    from tensorpress.compiler.tuning.meta_schedule_search import SearchBudget
    from tensorpress.compiler.tvm_log import tvm_log_routed

    budget = SearchBudget(trials_per_op=trials, max_ops=max_ops, trials_per_batch=min(16, trials))
    with tvm_log_routed():  # TVM's own log lines go to the log file, not over the progress bars
        return tune_generic_ops(mod, target, log_dir, budget, rpc_tracker, rpc_key)


def _template_space(target: TargetSpec) -> TemplateSpace:
    if target.kind != "cpu":
        raise ConfigError(
            f"template tuning for {target.name} is not built yet (its candidates are timed on a GPU); "
            "tune for --target cpu."
        )
    from tensorpress.compiler.tuning.template_search import cpu_weight_gemm_space

    return cpu_weight_gemm_space()


def _check_host_runs(target: TargetSpec) -> None:
    """Candidates are timed on this CPU: refuse a level it cannot run before any work (not a SIGILL later)."""
    from tensorpress.runtime.host_cpu import missing_cpu_flags

    missing = missing_cpu_flags(target.cpu_flags)
    if missing:
        raise ConfigError(
            f"this CPU lacks {', '.join(missing)}, so it cannot time kernels for --target {target.name}; tune on a "
            "machine that has them (or through --rpc-tracker), or tune for --target cpu:native."
        )


def _default_log(target: TargetSpec) -> Path:
    from tensorpress.compiler.tuning.records import default_log_dir

    return default_log_dir(target)
