"""Generic ops (an attention-like batched matmul + softmax lowered from Relax): found and ranked; a
meta_schedule record of one is applied by the build (the schedule TVM's own database replays) and the
outputs equal numpy; a broken log never stops a build. The search itself (meta_schedule with XGBoost, a
tiny budget, resumed after a kill) is the slow test at the end: ~50 s on 2 cores."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tensorpress.compiler.build import build_library
from tensorpress.compiler.targets import TargetSpec
from tensorpress.compiler.tuning.generic_ops import (
    SearchBudget,
    find_generic_ops,
    lower_to_kernels,
    ops_worth_tuning,
    tune_generic_ops,
)
from tensorpress.compiler.tuning.generic_records import (
    FINISHED,
    MIN_GAIN,
    RECORDS,
    WORKLOADS,
    apply_generic_records,
    database_folder,
    op_key,
)

CPU = TargetSpec("cpu")
HEADS, SEQ = 2, 32
TINY = SearchBudget(trials_per_op=4, max_ops=1, trials_per_batch=4, population=16, evolve_iterations=1)


def _attention_scores():
    """softmax(q @ k) on [HEADS, SEQ, SEQ]: a batched matmul and a softmax, both generic ops."""
    from tvm import relax

    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((HEADS, SEQ, SEQ), "float32"))
    k = relax.Var("k", relax.TensorType((HEADS, SEQ, SEQ), "float32"))
    with bb.function("main", [q, k]):
        with bb.dataflow():
            scores = bb.emit(relax.op.matmul(q, k))
            out = bb.emit_output(bb.emit(relax.op.nn.softmax(scores, axis=-1)))
        bb.emit_func_output(out)
    return bb.get()


def _numpy_reference(q, k):
    s = q @ k
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def recorded_log(tmp_path_factory):
    """A log holding one record for the matmul, as a search writes it: a schedule sampled from
    meta_schedule's design space for the op, post-processed, committed to TVM's JSON database (with a
    made-up time: which schedule is applied is what the tests check, not how fast it is)."""
    from tvm.s_tir import meta_schedule as ms

    from tensorpress.compiler.tuning.generic_ops import _normalized_module
    from tensorpress.compiler.tuning.meta_schedule_search import tensor_intrin_package_without_import

    tensor_intrin_package_without_import(CPU)
    log_dir = tmp_path_factory.mktemp("recorded_log")
    workload = _normalized_module(lower_to_kernels(_attention_scores(), CPU)["matmul"])
    target = CPU.tvm_target()
    context = ms.TuneContext(
        mod=workload, target=target, space_generator="post-order-apply", search_strategy="replay-trace", num_threads=1
    )
    schedule = context.generate_design_space()[-1]
    assert all(postproc.apply(schedule) for postproc in context.space_generator.postprocs)
    folder = database_folder(log_dir)
    folder.mkdir(parents=True)
    database = ms.database.JSONDatabase(path_workload=str(folder / WORKLOADS), path_tuning_record=str(folder / RECORDS))
    args = ms.arg_info.ArgInfo.from_prim_func(workload["main"])
    database.commit_tuning_record(
        ms.database.TuningRecord(schedule.trace, database.commit_workload(workload), [1e-5], target, args)
    )
    return log_dir


def _popen_workers_of_this_process() -> list:
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if "tvm.exec.popen_worker" in " ".join(p.cmdline())]


def _run(library, q, k):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(q, tvm.cpu()), tvm.runtime.tensor(k, tvm.cpu())).numpy()


def test_finds_the_generic_ops_costliest_first():
    ops = find_generic_ops(lower_to_kernels(_attention_scores(), CPU))
    assert [op.name for op in ops] == ["matmul", "softmax"]  # 2*H*S^3 flops beat the softmax's
    assert ops[0].flops == 2 * HEADS * SEQ**3 and all(op.calls == 1 for op in ops)
    assert ops_worth_tuning(ops, max_ops=1) == ops[:1]


def test_the_build_applies_the_best_record_and_matches_numpy(recorded_log, tmp_path):
    import tvm
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    log_dir = recorded_log
    folder = database_folder(log_dir)
    lowered = lower_to_kernels(_attention_scores(), CPU)
    target = CPU.tvm_target()
    applied, tuned = apply_generic_records(lowered, target, log_dir)
    assert tuned == ["matmul"]
    assert applied["matmul"].attrs["tirx.is_scheduled"] and "tirx.is_scheduled" not in (applied["softmax"].attrs or {})
    # the applied kernel is the best record's schedule, as TVM's own database replays it
    database = ms.database.JSONDatabase(path_workload=str(folder / WORKLOADS), path_tuning_record=str(folder / RECORDS))
    best = database.query_schedule(
        tvm.IRModule({"main": lowered["matmul"].with_attr("global_symbol", "main")}), target, "main"
    )
    assert tvm_ffi.structural_equal(applied["matmul"].body, best.mod["main"].body)

    build = build_library(_attention_scores(), CPU, tmp_path / "tuned.so", tuning_logs=[log_dir])
    assert build.tuned_kernels == ["matmul"]
    rng = np.random.default_rng(0)
    q, k = (rng.standard_normal((HEADS, SEQ, SEQ)).astype("float32") for _ in range(2))
    np.testing.assert_allclose(_run(build.library, q, k), _numpy_reference(q, k), rtol=1e-5, atol=1e-6)


def test_a_record_no_faster_than_the_rules_is_not_applied(recorded_log, tmp_path):
    log_dir = tmp_path / "slower"
    shutil.copytree(recorded_log, log_dir)
    lowered = lower_to_kernels(_attention_scores(), CPU)
    entry = {"op": op_key(lowered["matmul"]), "name": "matmul", "trials": 1, "default_s": 1e-5, "best_s": 2e-5}
    (database_folder(log_dir) / FINISHED).write_text(json.dumps(entry) + "\n")
    assert apply_generic_records(lowered, CPU.tvm_target(), log_dir)[1] == []
    entry.update(best_s=0.5e-5)
    (database_folder(log_dir) / FINISHED).write_text(json.dumps(entry) + "\n")
    assert apply_generic_records(lowered, CPU.tvm_target(), log_dir)[1] == ["matmul"]


def test_a_broken_or_missing_log_is_skipped_with_one_warning(recorded_log, tmp_path, caplog):
    lowered = lower_to_kernels(_attention_scores(), CPU)
    target = CPU.tvm_target()
    assert apply_generic_records(lowered, target, tmp_path / "no_such_log") == (lowered, [])
    # garbage lines among good ones: those are skipped, the good records still apply
    log_dir = tmp_path / "damaged"
    shutil.copytree(recorded_log, log_dir)
    records = database_folder(log_dir) / RECORDS
    with open(records, "a") as file:
        file.write("not json\n[0, [[[\n")
    with caplog.at_level(logging.WARNING, logger="tensorpress.compile"):
        _, tuned = apply_generic_records(lowered, target, log_dir)
    assert tuned == ["matmul"]
    assert len(caplog.records) == 1 and str(records) in caplog.records[0].getMessage()
    # a record that is JSON but not a record: the whole log is ignored, the build still works
    caplog.clear()
    records.write_text('[0, "not a record"]\n')
    with caplog.at_level(logging.WARNING, logger="tensorpress.compile"):
        build = build_library(_attention_scores(), CPU, tmp_path / "plain.so", tuning_logs=[log_dir])
    assert build.tuned_kernels == []
    assert len(caplog.records) == 1 and str(records) in caplog.records[0].getMessage()


def test_a_model_without_static_generic_ops_searches_nothing_and_writes_no_log(tmp_path):
    """A softmax over a symbolic sequence (MiniLM's generic ops all have a batch and a sequence): no search,
    and no empty meta_schedule database left in the log folder."""
    from tvm import relax, tirx

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((HEADS, tirx.Var("seq", "int64")), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.softmax(x, axis=-1)))
        bb.emit_func_output(out)
    assert tune_generic_ops(bb.get(), CPU, tmp_path / "log", TINY) == []
    assert not (tmp_path / "log").exists()


@pytest.mark.slow
def test_tuning_writes_records_resumes_and_the_build_applies_them(tmp_path):
    log_dir = tmp_path / "log"
    (result,) = tune_generic_ops(_attention_scores(), CPU, log_dir, TINY)
    assert not _popen_workers_of_this_process()  # meta_schedule's builder and runner workers are gone
    folder = database_folder(log_dir)
    assert result.name == "matmul" and result.searched and result.trials == TINY.trials_per_op
    assert result.best_s is not None and result.best_s > 0
    assert len((folder / RECORDS).read_text().splitlines()) == TINY.trials_per_op
    # a kill -9 mid-append leaves a partial line; the next run cuts it and does not search the op again
    with open(folder / RECORDS, "a") as records:
        records.write('[0, [[["Sample')
    (rerun,) = tune_generic_ops(_attention_scores(), CPU, log_dir, TINY)
    assert not rerun.searched and rerun.trials == TINY.trials_per_op
    # an op interrupted after its last trial (no finished line yet) is not searched either
    (folder / FINISHED).unlink()
    (resumed,) = tune_generic_ops(_attention_scores(), CPU, log_dir, TINY)
    assert not resumed.searched and (folder / FINISHED).read_text().count("\n") == 1
    # the record is applied only where the search beat our rules, both timed by meta_schedule's runner
    # (the resumed run timed the rules again: its finished line is the one the build reads)
    assert resumed.default_s is not None and resumed.default_s > 0 and resumed.best_s == result.best_s
    build = build_library(_attention_scores(), CPU, tmp_path / "tuned.so", tuning_logs=[log_dir])
    assert build.tuned_kernels == (["matmul"] if resumed.best_s * MIN_GAIN < resumed.default_s else [])
    rng = np.random.default_rng(1)
    q, k = (rng.standard_normal((HEADS, SEQ, SEQ)).astype("float32") for _ in range(2))
    np.testing.assert_allclose(_run(build.library, q, k), _numpy_reference(q, k), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_tuning_measures_on_every_server_of_a_tracker(tmp_path):
    from tensorpress.compiler.tuning.loopback_rpc import LoopbackRpcCluster

    with LoopbackRpcCluster(servers=2, key="ms-cpu", log_dir=tmp_path / "rpc") as cluster:
        (result,) = tune_generic_ops(
            _attention_scores(), CPU, tmp_path / "log", TINY, rpc_tracker=cluster.tracker, rpc_key=cluster.key
        )
        server_logs = [log.read_text() for log in cluster.server_logs()]
    assert result.searched and result.trials == TINY.trials_per_op and result.best_s is not None
    assert all("load_module" in text for text in server_logs)  # meta_schedule's RPCRunner used both


@pytest.mark.slow
def test_a_tune_killed_mid_search_resumes_without_measuring_again(tmp_path):
    budget = SearchBudget(trials_per_op=8, max_ops=1, trials_per_batch=4, population=16, evolve_iterations=1)
    log_dir = tmp_path / "log"
    records = database_folder(log_dir) / RECORDS
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_generic_ops import _attention_scores, CPU\n"
        "from tensorpress.compiler.tuning.generic_ops import SearchBudget, tune_generic_ops\n"
        f"tune_generic_ops(_attention_scores(), CPU, {str(log_dir)!r}, {budget!r})\n"
    )
    tune = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (records.is_file() and records.read_text().count("\n") >= budget.trials_per_batch):
            assert tune.poll() is None and time.monotonic() < deadline, "the first batch was never recorded"
            time.sleep(0.2)
    finally:
        os.killpg(tune.pid, signal.SIGKILL)  # the tune and its popen workers, mid-search
        tune.wait()
    measured_before = records.read_text().count("\n")
    assert measured_before < budget.trials_per_op
    (result,) = tune_generic_ops(_attention_scores(), CPU, log_dir, budget)
    assert result.searched and result.trials == budget.trials_per_op
    assert records.read_text().count("\n") == budget.trials_per_op  # the first batch was not measured again
