"""The generic ops of a model, tuned by TVM's meta_schedule.

The generic ops are the TIR functions the Relax lowering makes (`build.relax_lowering`: legalize, fuse)
that our templates do not own (weight GEMM, KV append and attention, marked `tensorpress.kernel`):
softmax, layer norm, the attention's batched matmuls, fused elementwise tails. Each distinct one worth
it is searched with meta_schedule (evolutionary search ranked by its XGBoost cost model), measured here
(LocalRunner) or on the servers of a TVM RPC tracker (RPCRunner), and its trials go to TVM's JSON
database in `<log dir>/meta_schedule/` (`generic_records.py`), which the build then applies.

Which ops: the distinct functions (structurally equal copies are one op, their calls add up), with static
shapes only (a record is for one shape), ranked by calls x (estimated FLOPs + argument bytes) per model
call; the top `max_ops` whose share is at least 1% of the top op's are tuned.

After its search, each op's default schedule (our rules, what a build without the log gives it) is
measured by the same runner; both times go to finished_ops.jsonl, and the build applies the record only
where it is at least 3% faster (generic_records.MIN_GAIN).

Resuming: an op whose search finished (a line in finished_ops.jsonl) is not searched again; an op a kill
interrupted is searched for its remaining trials only, starting from its measured records.

How one op is searched, and the cold-start and clean-up work around it: `meta_schedule_search.py`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tensorpress.compiler.targets import TargetSpec
from tensorpress.compiler.tuning.generic_records import (
    FINISHED,
    database_folder,
    finished_ops,
    is_template_kernel,
    normalized,
    op_key,
    open_tuning_database,
)
from tensorpress.compiler.tuning.meta_schedule_search import (
    SearchBudget,
    default_schedule_seconds,
    killing_new_popen_workers,
    runner_factory,
    search_op,
)

log = logging.getLogger("tensorpress.tune")

MIN_SHARE = 0.01  # an op costing less than this share of the costliest op is not worth a search


@dataclass(frozen=True)
class GenericOp:
    """One distinct generic op: its lowered function (first name it has), call count, estimated work."""

    name: str
    func: Any  # tvm.tirx.PrimFunc
    calls: int
    flops: float  # per call (TVM's estimate)
    bytes: int  # of its arguments, per call

    @property
    def cost(self) -> float:
        return self.calls * (self.flops + self.bytes)


@dataclass(frozen=True)
class GenericOpResult:
    """What tuning did for one op: measured trials in the log, seconds per call of the best candidate and
    of the default schedule (our rules) on the same runner (None: did not run), and whether it was
    searched now (False: already finished in the log). The build applies the record only when faster."""

    name: str
    calls: int
    trials: int
    best_s: float | None
    default_s: float | None
    searched: bool

    @property
    def speedup(self) -> float | None:
        return self.default_s / self.best_s if self.best_s and self.default_s else None


def lower_to_kernels(mod: Any, target_spec: TargetSpec) -> Any:
    """The Relax module after the build's lowering (fused TIR functions, nothing scheduled yet)."""
    import tvm

    from tensorpress.compiler.build import relax_lowering

    with target_spec.tvm_target():
        return tvm.transform.Sequential(relax_lowering())(mod)


def find_generic_ops(lowered: Any) -> list[GenericOp]:
    """The distinct generic ops of a lowered module with static shapes, costliest first."""
    import tvm
    import tvm_ffi
    from tvm import relax
    from tvm.s_tir.analysis import estimate_tir_flops

    calls: dict[str, int] = {}

    def count(expr: Any) -> None:
        if isinstance(expr, relax.Call) and expr.args and isinstance(expr.args[0], tvm.ir.GlobalVar):
            calls[expr.args[0].name_hint] = calls.get(expr.args[0].name_hint, 0) + 1

    for _, func in lowered.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, count)
    ops: list[GenericOp] = []
    for gv, func in lowered.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or is_template_kernel(func):
            continue
        nbytes = _static_argument_bytes(func)
        if nbytes is None:
            continue
        normal = normalized(func)
        same = next((i for i, op in enumerate(ops) if tvm_ffi.structural_equal(normalized(op.func), normal)), None)
        if same is not None:
            op = ops[same]
            ops[same] = GenericOp(op.name, op.func, op.calls + calls.get(gv.name_hint, 0), op.flops, op.bytes)
            continue
        flops = float(estimate_tir_flops(tvm.IRModule({"main": normal})))
        ops.append(GenericOp(gv.name_hint, func, calls.get(gv.name_hint, 0), flops, nbytes))
    return sorted(ops, key=lambda op: op.cost, reverse=True)


def ops_worth_tuning(ops: list[GenericOp], max_ops: int) -> list[GenericOp]:
    """The costliest `max_ops` ops (of `find_generic_ops`), less those under MIN_SHARE of the first."""
    if not ops:
        return []
    top = ops[0].cost
    return [op for op in ops[:max_ops] if op.cost > 0 and op.cost >= MIN_SHARE * top]


def tune_generic_ops(
    mod: Any,
    target_spec: TargetSpec,
    log_dir: Path,
    budget: SearchBudget | None = None,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    seed: int = 0,
    on_op_done: Callable[[GenericOpResult], None] | None = None,
) -> list[GenericOpResult]:
    """Tune the generic ops of `mod` (the Relax module the build gets, after the graph passes) with
    meta_schedule, appending every measured trial to `log_dir/meta_schedule/`. Measures on this machine,
    or on every server registered with the TVM RPC tracker `rpc_tracker` ("HOST:PORT") under `rpc_key`.
    Resumable: run it again after a kill and finished ops are skipped. `on_op_done` is called after
    each op (progress)."""
    budget = budget or SearchBudget()
    ops = ops_worth_tuning(find_generic_ops(lower_to_kernels(mod, target_spec)), budget.max_ops)
    if not ops:  # e.g. every op has a symbolic shape (a batch, a sequence): leave no empty database behind
        log.info("meta_schedule: no generic op with static shapes to search")
        return []
    folder = database_folder(log_dir)
    database = open_tuning_database(folder)
    finished = finished_ops(log_dir)
    runner = runner_factory(rpc_tracker, rpc_key)
    results = []
    for op in ops:
        key = op_key(op.func)
        workload = _normalized_module(op.func)
        searched = False
        if key not in finished:
            remaining = budget.trials_per_op - _trials_in(database, workload)
            with killing_new_popen_workers():
                meta_schedule_runner = runner()
                if remaining > 0:
                    log.info("meta_schedule: %s, %d trials", op.name, remaining)
                    work_dir = folder / "search" / op.name  # meta_schedule's own logs
                    search_op(workload, target_spec, work_dir, database, budget, remaining, meta_schedule_runner, seed)
                    searched = True
                default_s = default_schedule_seconds(workload, target_spec, meta_schedule_runner)
            best_s = _best_s(database, workload)
            entry = {
                "op": key,
                "name": op.name,
                "trials": budget.trials_per_op,
                "default_s": default_s,
                "best_s": best_s,
            }
            _append_line(folder / FINISHED, entry)
            finished[key] = entry
        entry = finished[key]
        result = GenericOpResult(
            op.name, op.calls, _trials_in(database, workload), entry.get("best_s"), entry.get("default_s"), searched
        )
        results.append(result)
        if on_op_done is not None:
            on_op_done(result)
    return results


def _normalized_module(func: Any) -> Any:
    import tvm

    return tvm.IRModule({"main": normalized(func)})


def _static_argument_bytes(func: Any) -> int | None:
    import tvm

    total = 0
    for param in func.params:  # TVM 0.27: a buffer argument is a Var whose type is a BufferType
        buffer = param.ty
        if not isinstance(buffer, tvm.tirx.buffer.BufferType):
            continue
        if not all(isinstance(dim, tvm.tirx.IntImm) for dim in buffer.shape):
            return None
        total += int(np.prod([int(dim) for dim in buffer.shape])) * tvm.DataType(buffer.dtype).bits // 8
    return total


def _trials_in(database: Any, workload: Any) -> int:
    import tvm_ffi

    return sum(
        1 for record in database.get_all_tuning_records() if tvm_ffi.structural_equal(record.workload.mod, workload)
    )


def _best_s(database: Any, workload: Any) -> float | None:
    if not database.has_workload(workload):
        return None
    top = database.get_top_k(database.commit_workload(workload), 1)
    if not top or not top[0].run_secs:
        return None
    best = min(float(s) for s in top[0].run_secs)
    return best if best < 1e9 else None


def _append_line(path: Path, entry: dict) -> None:
    """Append one JSON line whole: written, flushed and fsynced at once (a kill leaves it or not)."""
    with open(path, "ab") as file:
        file.write(json.dumps(entry).encode() + b"\n")
        file.flush()
        os.fsync(file.fileno())
