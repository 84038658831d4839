"""The CUDA schedule of paged attention without a GPU: replayed on the CPU against numpy (ragged batches,
GQA, several chunks, shuffled threads, poisoned scratch), planted bugs that compile for CUDA and fail the
replay, barriers between the shared-memory stages in the lowered kernel, and ptxas/SASS resources."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from kv_reference import attention_reference, chunked_attention_reference, paged_batch
from tvm import tirx
from tvm.s_tir import stmt as sblock_stmt

from tensorpress.compiler.formats import get_kv_cache_format
from tensorpress.schedules.kv_attention import chunk_tokens, kv_append_func, paged_attention_func
from tensorpress.schedules.kv_attention_cuda import schedule_append, schedule_attention
from tensorpress.schedules.verification.kv_attention_replay import build_replay

AUTO = get_kv_cache_format("auto")  # the unquantised cache in the model dtype: the kernels as they have always been

PS = 4  # small pages: many page boundaries inside each chunk


def scheduled(heads, kv_heads, head_dim, phase="decode", mutate=None):
    func = paged_attention_func(AUTO, heads, kv_heads, head_dim, PS, "float32", phase)
    func = schedule_attention(func).mod["main"]
    if mutate is not None:
        func = mutate(func)
    return tvm.IRModule({"attention": func.with_attr("global_symbol", "attention")})


def run(lib, batch):
    out = tvm.runtime.tensor(np.full(batch.q.shape, np.nan, batch.q.dtype))
    lib["attention"](*[tvm.runtime.tensor(a) for a in batch.arrays()], batch.layer, out)
    return out.numpy()


def decode_batch(rng, heads, kv_heads, head_dim):
    """Ragged decode: one query per sequence; 1, 2 and 3 chunks of 64, one sequence shorter than a page."""
    return paged_batch(rng, heads, kv_heads, head_dim, PS, lengths=[150, 3, 64, 65, 90], new=[1] * 5)


def prefill_batch(rng, heads, kv_heads, head_dim):
    """Ragged prefill: several queries per sequence, some with cached history."""
    return paged_batch(rng, heads, kv_heads, head_dim, PS, lengths=[70, 9, 130], new=[6, 9, 3])


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, phase",
    [(4, 2, 16, "decode"), (2, 2, 32, "decode"), (6, 1, 16, "prefill"), (8, 8, 16, "prefill")],
)
def test_replay_matches_numpy(heads, kv_heads, head_dim, phase):
    rng = np.random.default_rng(heads * 100 + head_dim)
    make = decode_batch if phase == "decode" else prefill_batch
    batch = make(rng, heads, kv_heads, head_dim)
    mod = scheduled(heads, kv_heads, head_dim, phase)
    expected = attention_reference(batch)
    for seed in (None, 0, 1):
        out = run(build_replay(mod, seed), batch)
        np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5, err_msg=f"seed {seed}")


def test_replay_computes_the_chunked_definition_exactly_where_sums_keep_their_order():
    # the chunked reference has the kernel's summation orders except the q·k dot (TVM's cross-thread
    # sum pairs the lanes as a tree); agreement to ~1 ulp of the output shows the two-stage form is it
    rng = np.random.default_rng(5)
    batch = decode_batch(rng, 4, 2, 16)
    chunked = chunked_attention_reference(batch, chunk_tokens(4, 2))
    np.testing.assert_allclose(chunked, attention_reference(batch), rtol=1e-5, atol=1e-5)
    out = run(build_replay(scheduled(4, 2, 16), seed=3), batch)
    np.testing.assert_allclose(out, chunked, rtol=1e-5, atol=1e-6)


def test_the_replay_runs_every_thread_in_shuffled_order_and_poisons_scratch():
    """A sanity check of the harness: with scratch poisoned, an unwritten shared element gives NaN."""
    rng = np.random.default_rng(6)
    batch = decode_batch(rng, 4, 2, 16)
    out = run(build_replay(scheduled(4, 2, 16, mutate=_drop_last_key_row_copy), seed=2), batch)
    assert np.isnan(out).any()


# --- planted bugs: each compiles for CUDA (nvcc, sm_80) and must fail the replay ----------------------


def _rewrite_loads(func, block_name, buffer_name, rewrite_indices):
    """`func` with the loads of `buffer_name` inside block `block_name` re-indexed by `rewrite_indices`."""

    def fix_load(load):
        if load.source.name != buffer_name:
            return load
        return tirx.BufferLoad(load.source, rewrite_indices(list(load.indices)))

    def fix_block(block):
        if block.name_hint != block_name:
            return block
        body = tvm_ffi.structural_map(block.body, (tvm.ir.TensorLoad, fix_load))
        return sblock_stmt.SBlock(
            block.iter_vars, block.reads, block.writes, block.name_hint, body, block.init,
            block.alloc_buffers, block.match_buffers, block.annotations,
        )  # fmt: skip

    return func.with_body(tvm_ffi.structural_map(func.body, (sblock_stmt.SBlock, fix_block)))


def _key_row_off_by_one(func):
    """The key gather reads the next row of the page (positions % PS + 1, wrapping)."""
    return _rewrite_loads(func, "keys", "pages", lambda ix: ix[:4] + [tirx.floormod(ix[4] + 1, PS)] + ix[5:])


def _merge_reads_next_chunk(func):
    """The merge weights chunk c's max with chunk c + 1's partial sums (wrapping)."""

    def shift(ix):
        chunks = [b for b in func.params if b.name == "positions"]  # noqa: F841 - for readability only
        return ix[:2] + [tirx.floormod(ix[2] + 1, _workspace_chunks(func))] + ix[3:]

    return _rewrite_loads(func, "merged_acc", "chunk_acc", shift)


def _workspace_chunks(func):
    block_table = func.params[4]
    chunk = int(func.attrs["tensorpress.kv_chunk"])
    return (block_table.shape[1] * PS + chunk - 1) // chunk


def _score_reads_the_next_thread_rows_key(func):
    """q·k takes its K row from the shared tile one thread row (8 positions) further on (wrapping)."""
    chunk = int(func.attrs["tensorpress.kv_chunk"])
    return _rewrite_loads(func, "score", "keys_shared", lambda ix: ix[:3] + [tirx.floormod(ix[3] + 8, chunk)] + ix[4:])


def _drop_last_key_row_copy(func):
    """The copy of the keys tile skips its last thread row (used by the harness sanity test)."""

    def fix_realize(realize):
        if realize.block.name_hint != "keys":
            return realize
        keep = realize.iter_values[3] < int(realize.block.iter_vars[3].dom.extent) - 1
        return sblock_stmt.SBlockRealize(realize.iter_values, tirx.And(realize.predicate, keep), realize.block)

    return func.with_body(tvm_ffi.structural_map(func.body, (sblock_stmt.SBlockRealize, fix_realize)))


PLANTED = {
    "wrong page row": _key_row_off_by_one,
    "merge order off by one chunk": _merge_reads_next_chunk,
    "q·k reads the next thread row's key": _score_reads_the_next_thread_rows_key,
}


def test_a_padded_head_split_races_between_ctas_and_the_shuffled_replay_sees_it(monkeypatch):
    """Heads split with padding (2 heads in passes of 4) make the region-derived write-back of chunk_acc
    cover the next kv group's heads: two CTAs write the same workspace rows, and the result depends on
    which runs last. The replay's shuffled CTA order shows it; the shipped schedule splits by divisors."""
    import tensorpress.schedules.kv_attention_cuda as cuda_schedule

    monkeypatch.setattr(cuda_schedule, "pv_plan", lambda group, head_dim: (4, 8))
    monkeypatch.setattr(cuda_schedule, "_divisor_at_most", lambda n, cap: cap)
    mod = scheduled(4, 2, 16)
    rng = np.random.default_rng(8)
    batch = decode_batch(rng, 4, 2, 16)
    expected = attention_reference(batch)
    errors = [np.nan_to_num(np.abs(run(build_replay(mod, seed), batch) - expected), nan=1.0).max() for seed in range(6)]
    assert max(errors) > 1e-2, errors


@pytest.mark.parametrize("bug", list(PLANTED))
def test_planted_bug_compiles_for_cuda_and_fails_the_replay(bug):
    from tensorpress.compiler.cuda.toolchain import ensure_cuda_build_support
    from tensorpress.schedules.verification.cuda_inspection import compile_cubin, cuda_source

    ensure_cuda_build_support()
    mod = scheduled(4, 2, 16, mutate=PLANTED[bug])
    cubin, _ = compile_cubin(cuda_source(mod, "sm_80"), "sm_80")
    assert len(cubin) > 0
    rng = np.random.default_rng(7)
    batch = decode_batch(rng, 4, 2, 16)
    out = run(build_replay(mod, seed=1), batch)
    error = np.abs(out - attention_reference(batch)).max()
    assert not error < 1e-2, f"the replay did not notice '{bug}' (max error {error})"


# --- barriers ----------------------------------------------------------------------------------------


def _lowered_kernels(mod, arch="sm_80"):
    from tensorpress.compiler.cuda.toolchain import ensure_cuda_build_support
    from tensorpress.schedules.verification.cuda_inspection import ASYNC_COPY_CONFIG, _lower_device, cuda_target

    ensure_cuda_build_support()
    target = cuda_target(arch)
    with target, tvm.transform.PassContext(config=ASYNC_COPY_CONFIG):
        return list(_lower_device(mod, target).functions.values())


def shared_memory_events(stmt, events=None):
    """(kind, shared buffer name, statement id) in program order, loops walked once. kind is read,
    write or sync; the id names the store a read or write belongs to (a read-modify-write of one
    element by one thread is one statement)."""
    events = [] if events is None else events

    def loads(node, sid):
        found = []
        tvm_ffi.structural_map(node, (tvm.ir.TensorLoad, lambda load: found.append(load) or load))
        return [("read", ld.source.name, sid) for ld in found if ld.source.scope().startswith("shared")]

    if isinstance(stmt, tirx.SeqStmt):
        for child in stmt.seq:
            shared_memory_events(child, events)
    elif isinstance(stmt, tirx.BufferStore):
        sid = len(events)
        events += loads(stmt.value, sid) + [e for ix in stmt.indices for e in loads(ix, sid)]
        if stmt.buffer.scope().startswith("shared"):
            events.append(("write", stmt.buffer.name, sid))
    elif isinstance(stmt, tirx.Evaluate):
        call = stmt.value
        if isinstance(call, tvm.ir.Call) and "tvm_storage_sync" in str(call.op.name):
            events.append(("sync", None, len(events)))
        else:
            events += loads(stmt, len(events))
    elif isinstance(stmt, tirx.IfThenElse):
        events += loads(stmt.condition, len(events))
        shared_memory_events(stmt.then_case, events)
        if stmt.else_case is not None:
            shared_memory_events(stmt.else_case, events)
    elif hasattr(stmt, "body"):
        for attr in ("value", "extent", "condition"):
            if hasattr(stmt, attr) and isinstance(getattr(stmt, attr), tvm.ir.expr.Expr):
                events += loads(getattr(stmt, attr), len(events))
        shared_memory_events(stmt.body, events)
    return events


def unsynchronised_reads(events):
    """Reads of a shared buffer whose last write (by another statement) has no sync after it."""
    written = {}
    bad = []
    for kind, name, sid in events:
        if kind == "sync":
            written.clear()
        elif kind == "write":
            written[name] = sid
        elif name in written and written[name] != sid:
            bad.append((name, written[name], sid))
    return bad


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 8, 128), (16, 2, 64)])
def test_every_shared_read_follows_a_barrier_after_another_stage_wrote_it(heads, kv_heads, head_dim):
    func = schedule_attention(paged_attention_func(AUTO, heads, kv_heads, head_dim, 16, "float16", "decode"))
    kernels = _lowered_kernels(tvm.IRModule({"attention": func.mod["main"].with_attr("global_symbol", "a")}))
    stage1 = [k for k in kernels if "shared" in k.script()]
    assert len(stage1) == 1
    events = shared_memory_events(stage1[0].body)
    assert sum(kind == "sync" for kind, _, _ in events) >= 4
    assert {name for kind, name, _ in events if kind == "write"} >= {"q_scaled_shared", "keys_shared"}
    assert unsynchronised_reads(events) == []


def test_the_barrier_check_flags_a_missing_barrier():
    events = [("write", "keys_shared", 0), ("read", "keys_shared", 1)]
    assert unsynchronised_reads(events) == [("keys_shared", 0, 1)]
    assert unsynchronised_reads([events[0], ("sync", None, 1), events[1]]) == []
    assert unsynchronised_reads([("read", "acc", 3), ("write", "acc", 3), ("read", "acc", 3)]) == []


def test_the_barrier_check_finds_a_barrier_removed_from_the_kernel():
    func = schedule_attention(paged_attention_func(AUTO, 32, 8, 128, 16, "float16", "decode"))
    mod = tvm.IRModule({"a": func.mod["main"].with_attr("global_symbol", "a")})
    kernel = next(k for k in _lowered_kernels(mod) if "shared" in k.script())
    syncs = []

    def drop_second_sync(stmt):
        call = stmt.value
        if isinstance(call, tvm.ir.Call) and "tvm_storage_sync" in str(call.op.name):
            syncs.append(stmt)
            if len(syncs) == 2:
                return tirx.Evaluate(tirx.IntImm("int32", 0))
        return stmt

    broken = tvm_ffi.structural_map(kernel.body, (tirx.Evaluate, drop_second_sync))
    assert unsynchronised_reads(shared_memory_events(kernel.body)) == []
    assert unsynchronised_reads(shared_memory_events(broken)) != []


# --- real compiles: resources and the instructions that matter ------------------------------------------

# (query heads, kv heads, head_dim): GQA groups 1, 2, 4, 7, 8 at head_dim 64 and 128
CONFIGS = [(h * g, h, d) for d in (64, 128) for h, g in ((32, 1), (8, 2), (8, 4), (4, 7), (8, 8))]
FAST_CONFIGS = [(32, 32, 128), (64, 8, 64)]


def _check_resources(heads, kv_heads, head_dim, arch):
    from tensorpress.compiler.cuda.toolchain import ensure_cuda_build_support
    from tensorpress.schedules.verification.cuda_inspection import inspect_cuda

    ensure_cuda_build_support()
    attention = schedule_attention(paged_attention_func(AUTO, heads, kv_heads, head_dim, 16, "float16", "decode"))
    append = schedule_append(kv_append_func(AUTO, kv_heads, head_dim, 16, "float16"))
    mod = tvm.IRModule(
        {
            "attention": attention.mod["main"].with_attr("global_symbol", "attention"),
            "append": append.mod["main"].with_attr("global_symbol", "append"),
        }
    )
    reports = {r.name: r for r in inspect_cuda(mod, arch)}
    assert set(reports) == {"attention_kernel", "attention_kernel_1", "append_kernel"}
    for r in reports.values():
        assert r.registers < 128, r.summary()
        assert r.spill_bytes == 0 and r.stack_bytes == 0, r.summary()
        assert r.sass["LDL"] == 0 and r.sass["STL"] == 0, r.summary()
        assert r.shared_bytes <= 48 * 1024, r.summary()
    stage1 = reports["attention_kernel"]
    # the cross-thread sums became warp shuffles (not read-modify-writes of shared memory)
    assert stage1.sass["SHFL"] > 0, stage1.summary()
    assert stage1.sass["BAR"] >= 4, stage1.summary()
    return reports


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("heads, kv_heads, head_dim", FAST_CONFIGS)
def test_resources_for_cuda(heads, kv_heads, head_dim, arch):
    _check_resources(heads, kv_heads, head_dim, arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("heads, kv_heads, head_dim", CONFIGS)
def test_resources_for_cuda_every_config(heads, kv_heads, head_dim, arch):
    _check_resources(heads, kv_heads, head_dim, arch)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_k_and_v_rows_move_in_16_byte_loads(arch):
    from tensorpress.compiler.cuda.toolchain import ensure_cuda_build_support
    from tensorpress.schedules.verification.cuda_inspection import compile_cubin, cuda_source, disassemble

    ensure_cuda_build_support()
    func = schedule_attention(paged_attention_func(AUTO, 32, 8, 128, 16, "float16", "decode")).mod["main"]
    mod = tvm.IRModule({"attention": func.with_attr("global_symbol", "attention")})
    cubin, _ = compile_cubin(cuda_source(mod, arch), arch)
    functions = disassemble(cubin).split("Function : ")
    stage1 = next(f for f in functions if f.startswith("attention_kernel\n"))
    assert "LDG.E.128" in stage1  # K tile and V rows: 8 fp16 per load
    assert "STS.128" in stage1  # the K tile into shared memory
