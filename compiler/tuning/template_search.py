"""Search one template kernel's config space with measured candidates ranked by an XGBoost model.

    space    = the template's valid configs for the kernel, the default first
    measured = the trials already in the log for this kernel (a rerun measures none of them again)
    1. the default config (its time is the summary's "default time")
    2. a random batch of the rest (seeded by the kernel, so a rerun proposes the same ones)
    3. until `trials` are measured, the space is exhausted or the deadline passes, batches of the
       model's best predictions (gradient-boosted trees on config features, fitted to log-seconds of
       every measured trial) plus some random picks (exploration)
    4. the default and the CONFIRM_TOP fastest trials timed again, CONFIRM_ROUNDS rounds in turn (each
       round in another order): one lucky measurement on a busy machine does not make a config the
       best; each one's figure is its fastest round, and another config replaces the default only
       when it is faster by more than CONFIRM_MARGIN
    5. a "best" record (confirmed times): the kernel is finished, a rerun skips it

Each candidate is built here (the PrimFunc scheduled with the config, compiled, exported with the
measurer's library suffix) and timed by the `Measurer` (`measure.py`): locally, or on remote devices.
Every trial is appended to the log as soon as its batch is timed (`records.py`).
"""

from __future__ import annotations

import hashlib
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tensorpress.compiler.targets import TargetSpec
from tensorpress.compiler.tuning.measure import ArgSpec, BuiltCandidate, LocalMeasurer, Measurer
from tensorpress.compiler.tuning.records import Record, append_record, key_text, read_records

BATCH = 4  # candidates built and timed together (an RPC measurer runs them side by side)
INITIAL_RANDOM = 8  # measured trials (the default included) before the model ranks candidates
EXPLORE = 1  # random picks in each model batch
CONFIRM_TOP = 3  # fastest trials timed again beside the default before the best is chosen
CONFIRM_ROUNDS = 5
# On this shared 2-core machine a 384x384 kernel's default timed 2.1 ms in the search and 0.73 ms alone
# (a tuned MiniLM came out 5-8 % slower than the untuned one): noise must not replace the default.
CONFIRM_MARGIN = 0.03


@dataclass(frozen=True)
class TemplateSpace:
    """What the search needs of a template: its name, its configs for a kernel (default first, as
    dicts), and how to schedule the kernel with one (a tvm Schedule)."""

    template: str
    configs: Callable[[Any, Any], list[dict[str, Any]]]  # (func, tvm target) -> configs
    schedule: Callable[[Any, Any, dict[str, Any]], Any]  # (func, tvm target, config) -> Schedule


def cpu_weight_gemm_space() -> TemplateSpace:
    from tensorpress.schedules.cpu.gemm_config import CpuGemmConfig, schedule_with_config, search_space
    from tensorpress.schedules.template_config import CPU_WEIGHT_GEMM

    return TemplateSpace(
        CPU_WEIGHT_GEMM,
        lambda func, target: [c.to_dict() for c in search_space(func, target)],
        lambda func, target, config: schedule_with_config(func, target, CpuGemmConfig.from_dict(config)),
    )


@dataclass(frozen=True)
class TemplateKernel:
    """One distinct kernel to tune: a name for people, its unscheduled PrimFunc, its record key and
    the token count it is timed at."""

    name: str
    func: Any
    key: dict[str, Any]
    tokens: int


@dataclass
class KernelResult:
    """The outcome of one kernel's search (or of the records, for a kernel finished before)."""

    name: str
    default_seconds: float
    best_seconds: float
    best_config: dict[str, Any]
    trials: int
    space_size: int
    history: list[tuple[float, float]] = field(default_factory=list)  # (elapsed s, seconds) per trial
    resumed: int = 0  # trials read back from the log instead of measured
    skipped: bool = False  # finished in an earlier run

    @property
    def speedup(self) -> float:
        return self.default_seconds / self.best_seconds if math.isfinite(self.best_seconds) else math.nan

    def seconds_to_within(self, fraction: float = 0.95) -> float | None:
        """Search time until a trial reached `fraction` of the best trial's speed (best / t >= fraction)."""
        best = min((seconds for _, seconds in self.history), default=math.inf)
        for elapsed, seconds in self.history:
            if best / seconds >= fraction:
                return elapsed
        return None


def argument_specs(func: Any, tokens: int) -> tuple[ArgSpec, ...]:
    """The kernel's arguments with every symbolic extent (the token count N) bound to `tokens`."""
    import tvm

    specs = []
    for buf in func.params:  # TVM 0.27: a PrimFunc's params are its buffers
        shape = tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else tokens for d in buf.shape)
        specs.append(ArgSpec(shape, str(buf.dtype)))
    return tuple(specs)


def build_candidate(
    kernel: TemplateKernel, space: TemplateSpace, config: dict[str, Any], target: TargetSpec, path: Path
) -> BuiltCandidate | None:
    """Compile `kernel` scheduled with `config` into the library `path`; None where it does not build."""
    import tvm

    from tensorpress.compiler.build import tir_pipeline

    tvm_target = target.tvm_target()
    try:
        with tvm_target:
            sch = space.schedule(kernel.func, tvm_target, config)
            func = sch.mod["main"].with_attr("global_symbol", "kernel")
            executable = tvm.compile(tvm.IRModule({"kernel": func}), target=tvm_target, tir_pipeline=tir_pipeline())
        executable.export_library(str(path))
    except Exception:  # noqa: BLE001 - a config TVM cannot schedule or build is a failed trial
        return None
    return BuiltCandidate(path, "kernel", argument_specs(kernel.func, kernel.tokens))


def search_kernel(
    kernel: TemplateKernel,
    space: TemplateSpace,
    target: TargetSpec,
    log_dir: Path,
    trials: int,
    deadline: float = math.inf,
    measurer: Measurer | None = None,
    progress: Callable[[int, int], Any] | None = None,
) -> KernelResult:
    """Tune one kernel (module docstring), appending to `log_dir`; `deadline` is a time.monotonic()
    value after which no new batch starts; progress(measured, total) after each batch."""
    measurer = measurer or LocalMeasurer()
    text = key_text(kernel.key)
    logged = [r for r in read_records([log_dir]) if key_text(r.key) == text]
    finished = [r for r in logged if r.type == "best"]
    configs = space.configs(kernel.func, target.tvm_target())
    if finished:
        return _result_from_records(kernel.name, logged, finished[-1], len(configs))
    measured: dict[str, float] = {}
    history: list[tuple[float, float]] = []
    for record in (r for r in logged if r.type == "trial"):
        if key_text(record.config) not in measured:
            measured[key_text(record.config)] = record.seconds
            history.append((float(record.fields.get("elapsed", 0.0)), record.seconds))
    resumed = len(measured)
    base = max((elapsed for elapsed, _ in history), default=0.0)
    start = time.monotonic()
    total = min(trials, len(configs))
    rng = random.Random(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))
    if progress:
        progress(len(measured), total)
    with tempfile.TemporaryDirectory(prefix="tensorpress-tune-") as tmp:
        while len(measured) < total and time.monotonic() < deadline:
            batch = _next_batch(configs, measured, min(BATCH, total - len(measured)), rng)
            if not batch:
                break
            built = [
                build_candidate(kernel, space, c, target, Path(tmp, f"c{len(measured) + i}{measurer.library_suffix}"))
                for i, c in enumerate(batch)
            ]
            runnable = [b for b in built if b is not None]
            times = iter(measurer.measure(runnable) if runnable else [])
            for config, candidate in zip(batch, built):
                seconds = next(times) if candidate is not None else math.inf
                elapsed = base + time.monotonic() - start
                append_record(log_dir, "trial", kernel.key, config, seconds, elapsed=round(elapsed, 3))
                measured[key_text(config)] = seconds
                history.append((elapsed, seconds))
            if progress:
                progress(len(measured), total)
        confirmed = _confirm(kernel, space, target, configs, measured, measurer, Path(tmp))
    default_seconds = confirmed.get(key_text(configs[0]), math.inf)
    best_text = _chosen(confirmed, key_text(configs[0]))
    best_config = next(c for c in configs if key_text(c) == best_text)
    best_seconds = confirmed.get(best_text, math.inf)
    elapsed = base + time.monotonic() - start
    if measured:
        append_record(
            log_dir,
            "best",
            kernel.key,
            best_config,
            best_seconds,
            default_seconds=default_seconds if math.isfinite(default_seconds) else None,
            trials=len(measured),
            elapsed=round(elapsed, 3),
        )
    return KernelResult(
        kernel.name, default_seconds, best_seconds, best_config, len(measured), len(configs), history, resumed
    )


def _confirm(kernel, space, target, configs, measured, measurer, folder: Path) -> dict[str, float]:
    """{config text: fastest of CONFIRM_ROUNDS new timings} of the default and the CONFIRM_TOP fastest
    trials (step 4 of the module docstring); {} when nothing was measured."""
    ranked = sorted((t for t in measured if math.isfinite(measured[t])), key=measured.__getitem__)
    default = key_text(configs[0])
    finalists = ([default] if default in measured else []) + [t for t in ranked if t != default][:CONFIRM_TOP]
    by_text = {key_text(c): c for c in configs}
    built = {
        t: build_candidate(kernel, space, by_text[t], target, folder / f"final{i}{measurer.library_suffix}")
        for i, t in enumerate(finalists)
    }
    runnable = [t for t in finalists if built[t] is not None]
    best = {t: math.inf for t in finalists}
    for round_ in range(CONFIRM_ROUNDS if runnable else 0):
        order = runnable[round_ % len(runnable) :] + runnable[: round_ % len(runnable)]
        for t, seconds in zip(order, measurer.measure([built[t] for t in order])):
            best[t] = min(best[t], seconds)
    return best


def _chosen(confirmed: dict[str, float], default: str) -> str:
    """The config text to keep: the fastest confirmed one if it beats the default by CONFIRM_MARGIN."""
    if not confirmed:
        return default
    fastest = min(confirmed, key=confirmed.__getitem__)
    if default in confirmed and confirmed[fastest] * (1 + CONFIRM_MARGIN) >= confirmed[default]:
        return default
    return fastest


def _next_batch(
    configs: list[dict[str, Any]], measured: dict[str, float], size: int, rng: random.Random
) -> list[dict[str, Any]]:
    """The default first, then random picks until INITIAL_RANDOM are measured, then the model's."""
    left = [c for c in configs if key_text(c) not in measured]
    if not left or size <= 0:
        return []
    batch: list[dict[str, Any]] = []
    if key_text(configs[0]) not in measured:
        batch.append(configs[0])
        left = left[1:]
    if len(measured) + len(batch) < INITIAL_RANDOM or len(left) <= size - len(batch):
        picks = rng.sample(left, min(size - len(batch), len(left)))
        return batch + picks
    ranked = _ranked_by_model(configs, measured, left)
    explore = min(EXPLORE, size - len(batch))
    chosen = ranked[: size - len(batch) - explore]
    rest = [c for c in left if c not in chosen]
    return batch + chosen + rng.sample(rest, min(explore, len(rest)))


def _ranked_by_model(
    configs: list[dict[str, Any]], measured: dict[str, float], left: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`left` ordered by the predicted time of an XGBoost model fitted to the measured trials."""
    import xgboost

    encode = config_encoder(configs)
    done = [c for c in configs if key_text(c) in measured]
    finite = [measured[key_text(c)] for c in done if math.isfinite(measured[key_text(c)])]
    worst = max(finite, default=1.0)
    y = np.log([min(measured[key_text(c)], 4 * worst) for c in done])  # a failed build: 4x the worst
    model = xgboost.XGBRegressor(n_estimators=60, max_depth=3, learning_rate=0.2, n_jobs=1, verbosity=0)
    model.fit(np.array([encode(c) for c in done]), y)
    predicted = model.predict(np.array([encode(c) for c in left]))
    return [left[i] for i in np.argsort(predicted, kind="stable")]


def config_encoder(configs: list[dict[str, Any]]) -> Callable[[dict[str, Any]], list[float]]:
    """Features of a config for the model: each numeric parameter and its log2, each named one one-hot
    over the values the space holds, and the product of the numeric ones (the register tile's area)."""
    names = sorted(configs[0])
    categories = {n: sorted({str(c[n]) for c in configs}) for n in names if isinstance(configs[0][n], str)}

    def encode(config: dict[str, Any]) -> list[float]:
        features: list[float] = []
        area = 1.0
        for name in names:
            value = config[name]
            if name in categories:
                features += [float(str(value) == v) for v in categories[name]]
            else:
                features += [float(value), math.log2(max(float(value), 1e-9))]
                area *= float(value)
        return [*features, area]

    return encode


def _result_from_records(name: str, logged: list[Record], best: Record, space_size: int) -> KernelResult:
    trials = [r for r in logged if r.type == "trial"]
    default = best.fields.get("default_seconds")
    return KernelResult(
        name,
        math.inf if default is None else float(default),
        best.seconds,
        best.config,
        int(best.fields.get("trials", len(trials))),
        space_size,
        [(float(r.fields.get("elapsed", 0.0)), r.seconds) for r in trials],
        resumed=len(trials),
        skipped=True,
    )
