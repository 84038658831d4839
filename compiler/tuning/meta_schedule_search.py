"""How one generic op is searched with TVM's meta_schedule, and what that costs to start.

    with killing_new_popen_workers():
        runner = runner_factory(tracker, key)()          # LocalRunner, or RPCRunner over the tracker
        search_op(workload, target, work_dir, database, budget, trials, runner, seed)
        default_s = default_schedule_seconds(workload, target, runner)

Cold start: meta_schedule's builder workers compile with `_builder_without_intrinsics` (TVM's default
builder imports every tensor intrinsic, 40 s, in each fresh worker), and this process skips that import
too on CPU targets (`tensor_intrin_package_without_import`). The popen workers meta_schedule starts and
leaves behind (field guide, section 6) are killed by pid when the block ends.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
import tempfile
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tensorpress.compiler.targets import TargetSpec

log = logging.getLogger("tensorpress.tune")


@dataclass(frozen=True)
class SearchBudget:
    """How much meta_schedule searches: `trials_per_op` measured candidates for each of at most `max_ops`
    ops, measured `trials_per_batch` at a time; the evolutionary search keeps `population` schedules and
    evolves them `evolve_iterations` times per batch (its cost-model work grows with both)."""

    trials_per_op: int = 64
    max_ops: int = 8
    trials_per_batch: int = 16
    population: int = 128
    evolve_iterations: int = 2


def search_op(workload, target_spec, work_dir: Path, database, budget: SearchBudget, trials: int, runner, seed) -> None:
    from tvm.s_tir import meta_schedule as ms

    tensor_intrin_package_without_import(target_spec)
    _unnamed_handlers_off_meta_schedule_logger()
    work_dir.mkdir(parents=True, exist_ok=True)
    strategy = ms.search_strategy.EvolutionarySearch(
        population_size=budget.population,
        init_min_unmeasured=min(50, budget.population),
        genetic_num_iters=budget.evolve_iterations,
    )
    ms.tune_tir(
        mod=workload,
        target=target_spec.tvm_target(),
        work_dir=str(work_dir),
        max_trials_global=trials,
        num_trials_per_iter=min(budget.trials_per_batch, trials),
        builder=ms.builder.LocalBuilder(f_build=_builder_without_intrinsics(), timeout_sec=120),
        runner=runner,
        database=database,
        cost_model="xgb",
        strategy=strategy,
        seed=seed,
    )


def _unnamed_handlers_off_meta_schedule_logger() -> None:
    """Each tune rebuilds meta_schedule's logging config from the names of its logger's handlers, and
    fails on a handler without a name (a second tune in one pytest process meets one)."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in list(logger.handlers):
        if handler.get_name() is None:
            logger.removeHandler(handler)


def default_schedule_seconds(workload, target_spec: TargetSpec, runner) -> float | None:
    """Seconds per call of the op as a build without the log schedules it (our rules), measured by the
    same meta_schedule runner as the candidates, so the two are compared alike; None if it fails."""
    import tvm
    from tvm.s_tir import dlight as dl
    from tvm.s_tir import meta_schedule as ms

    from tensorpress.compiler.build import rule_target_for
    from tensorpress.schedules.rules import rules_for

    target = target_spec.tvm_target()
    with rule_target_for(target_spec, target):  # on a copy: the pass updates the module it is given
        scheduled = dl.ApplyDefaultSchedule(*rules_for(target))(workload.clone())
    with tempfile.TemporaryDirectory(prefix="tensorpress-default-") as tmp:
        artifact = Path(tmp) / "default.tar"  # linked where it runs, as the candidates are
        tvm.tirx.build(scheduled, target=target).export_library(str(artifact))
        args = ms.arg_info.ArgInfo.from_prim_func(workload["main"])
        device = "cuda" if target_spec.kind == "cuda" else "cpu"
        (future,) = runner.run([ms.runner.RunnerInput(str(artifact), device, args)])
        result = future.result()
    if result.error_msg or not result.run_secs:
        log.warning("the default schedule of a generic op did not run: %s", result.error_msg)
        return None
    return float(np.median([float(s) for s in result.run_secs]))


def runner_factory(rpc_tracker: str | None, rpc_key: str | None) -> Callable[[], Any]:
    """meta_schedule's runner: LocalRunner, or RPCRunner over every server of the tracker (checked now,
    so a missing tracker or key is one clear error before any search)."""
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40, enable_cpu_cache_flush=False)
    if rpc_tracker is None:
        return lambda: ms.runner.LocalRunner(evaluator_config=evaluator)
    from tensorpress.compiler.tuning.rpc_measure import RpcMeasurer

    servers = RpcMeasurer(rpc_tracker, rpc_key or "").num_servers  # raises RpcTrackerError, one sentence
    host, _, port = rpc_tracker.rpartition(":")
    config = ms.runner.RPCConfig(
        tracker_host=host, tracker_port=int(port), tracker_key=rpc_key, session_timeout_sec=120
    )
    return lambda: ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=servers)


def _builder_without_intrinsics() -> Callable:
    """meta_schedule's default build minus its `import tvm.s_tir.tensor_intrin` (40 s in every fresh
    worker). Made in a function so cloudpickle sends it by value: the worker imports only TVM."""

    def build(mod, target, _params):
        import tvm
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        return tvm.tirx.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)

    return build


def tensor_intrin_package_without_import(target_spec: TargetSpec) -> None:
    """TuneContext imports `tvm.s_tir.tensor_intrin`, whose __init__ parses every intrinsic of every
    target (40 s). CPU targets without VNNI/AMX use none; so the package is registered unexecuted (its
    submodules still import on demand), and CUDA gets only its own intrinsics."""
    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        package = types.ModuleType(name)
        package.__path__ = list(spec.submodule_search_locations or []) if spec else []
        sys.modules[name] = package
    if target_spec.kind == "cuda":
        importlib.import_module(f"{name}.cuda")


@contextlib.contextmanager
def killing_new_popen_workers() -> Iterator[None]:
    """Kill, by pid, the `tvm.exec.popen_worker` children that meta_schedule starts and leaves behind."""
    import psutil

    me = psutil.Process()
    before = {child.pid for child in me.children(recursive=True)}
    try:
        yield
    finally:
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.pid not in before and "tvm.exec.popen_worker" in " ".join(child.cmdline()):
                    child.kill()
                    child.wait(timeout=10)
