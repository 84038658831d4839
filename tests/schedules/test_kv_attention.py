"""The paged KV kernels against numpy: append writes exactly the addressed rows, attention is causal GQA
over scattered pages for ragged batches, results are deterministic; the CUDA schedule builds with nvcc."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from kv_reference import attention_reference, chunked_attention_reference, paged_batch
from tvm.s_tir import dlight as dl

from tensorpress.compiler.formats import get_kv_cache_format
from tensorpress.schedules.kv_attention import (
    CPU_CHUNK_TOKENS,
    chunk_tokens,
    kv_append_func,
    kv_attention_rules,
    paged_attention_func,
)

AUTO = get_kv_cache_format("auto")  # the unquantised cache in the model dtype: the kernels as they have always been

H, KVH, D, PS, L = 4, 2, 16, 4, 2
LAYER = 1


def _build(funcs: dict, target: tvm.target.Target):
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    with target:
        mod = dl.ApplyDefaultSchedule(*kv_attention_rules())(mod)
    for func in mod.functions.values():
        assert func.attrs["tirx.is_scheduled"], "our rule must schedule every kernel of the file"
    with target:
        return tvm.compile(mod, target=target)


CPU = tvm.target.Target({"kind": "llvm", "num-cores": 2})


@pytest.fixture(scope="module", params=["float32", "float16"])
def cpu_kernels(request):
    dtype = request.param
    funcs = {
        "append": kv_append_func(AUTO, KVH, D, PS, dtype),
        "prefill": paged_attention_func(AUTO, H, KVH, D, PS, dtype, "prefill"),
        "decode": paged_attention_func(AUTO, H, KVH, D, PS, dtype, "decode"),
    }
    return dtype, _build(funcs, CPU)


def _ragged_batch(rng, dtype):
    """Two sequences with cached history, continued by new tokens: (8 cached + 3 new), (2 + 4)."""
    num_pages = 9
    block_table = np.array([[5, 0, 7], [2, 8, 0]], np.int32)  # scattered, unused entries 0
    cached, new = [8, 2], [3, 4]
    pool = rng.standard_normal((L, num_pages, 2, KVH, PS, D)).astype(dtype)
    positions = np.concatenate([np.arange(c, c + n) for c, n in zip(cached, new)]).astype(np.int32)
    seq_slot = np.repeat(np.arange(2), new).astype(np.int32)
    n = len(positions)
    k = rng.standard_normal((n, KVH, D)).astype(dtype)
    v = rng.standard_normal((n, KVH, D)).astype(dtype)
    q = rng.standard_normal((n, H, D)).astype(dtype)
    return pool, block_table, positions, seq_slot, q, k, v


def _numpy_append(pool, block_table, positions, seq_slot, k, v):
    out = pool.copy()
    for i, (p, s) in enumerate(zip(positions, seq_slot)):
        page = block_table[s, p // PS]
        out[LAYER, page, 0, :, p % PS] = k[i]
        out[LAYER, page, 1, :, p % PS] = v[i]
    return out


def _numpy_attention(q, pool, block_table, positions, seq_slot):
    """Gather each token's K/V rows 0..position from its pages, then softmax(q k^T / sqrt(D)) v."""
    out = np.zeros(q.shape, np.float64)
    for i, (p, s) in enumerate(zip(positions, seq_slot)):
        t = np.arange(p + 1)
        pages = block_table[s, t // PS]
        keys = pool[LAYER, pages, 0, :, t % PS].astype(np.float64)  # [T, KVH, D]
        values = pool[LAYER, pages, 1, :, t % PS].astype(np.float64)
        for h in range(H):
            g = h // (H // KVH)
            scores = keys[:, g] @ q[i, h].astype(np.float64) / np.sqrt(D)
            w = np.exp(scores - scores.max())
            out[i, h] = (w / w.sum()) @ values[:, g]
    return out


def _tensors(*arrays):
    return [tvm.runtime.tensor(a) for a in arrays]


def test_append_writes_exactly_the_addressed_rows(cpu_kernels):
    dtype, lib = cpu_kernels
    rng = np.random.default_rng(0)
    pool, block_table, positions, seq_slot, _, k, v = _ragged_batch(rng, dtype)
    pool_t, *args = _tensors(pool, k, v, positions, seq_slot, block_table)
    lib["append"](pool_t, *args, LAYER)
    np.testing.assert_array_equal(pool_t.numpy(), _numpy_append(pool, block_table, positions, seq_slot, k, v))


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_attention_matches_numpy_on_a_ragged_batch(cpu_kernels, phase):
    dtype, lib = cpu_kernels
    rng = np.random.default_rng(1)
    pool, block_table, positions, seq_slot, q, k, v = _ragged_batch(rng, dtype)
    if phase == "decode":  # one token per sequence: the last new token of each
        keep = np.array([2, 6])
        positions, seq_slot, q, k, v = positions[keep], seq_slot[keep], q[keep], k[keep], v[keep]
    pool = _numpy_append(pool, block_table, positions, seq_slot, k, v)
    out = tvm.runtime.empty(q.shape, dtype)
    lib[phase](*_tensors(q, pool, positions, seq_slot, block_table), LAYER, out)
    expected = _numpy_attention(q, pool, block_table, positions, seq_slot)
    tol = 1e-5 if dtype == "float32" else 2e-3
    np.testing.assert_allclose(out.numpy().astype(np.float64), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("heads, kv_heads, phase", [(4, 2, "decode"), (6, 1, "prefill"), (3, 3, "prefill")])
def test_attention_over_several_chunks_matches_numpy(heads, kv_heads, phase):
    """Contexts of 1 to 3 chunks (64 positions), pages of 4 tokens in shuffled order, ragged."""
    rng = np.random.default_rng(heads)
    new = [1, 1, 1, 1] if phase == "decode" else [5, 3, 2, 1]
    batch = paged_batch(rng, heads, kv_heads, D, 4, lengths=[150, 3, 64, 65], new=new)
    lib = _build({phase: paged_attention_func(AUTO, heads, kv_heads, D, 4, "float32", phase)}, CPU)
    out = tvm.runtime.empty(batch.q.shape, "float32")
    lib[phase](*_tensors(*batch.arrays()), batch.layer, out)
    np.testing.assert_allclose(out.numpy(), attention_reference(batch), rtol=1e-5, atol=1e-5)


def test_the_chunked_form_is_the_softmax_of_all_positions():
    """The two-stage math of the definition (numpy, in its summation orders) equals softmax attention."""
    rng = np.random.default_rng(11)
    batch = paged_batch(rng, 4, 2, 8, 4, lengths=[200, 7, 129], new=[3, 2, 1])
    for chunk in (8, 64):
        np.testing.assert_allclose(chunked_attention_reference(batch, chunk), attention_reference(batch), 1e-5, 1e-5)


def _chunk(func) -> int:
    return int(func.attrs["tensorpress.kv_chunk"])


def test_chunk_size_follows_the_query_heads_per_kv_head():
    assert [chunk_tokens(g * 4, 4) for g in (1, 2, 4, 5, 7, 8)] == [64, 64, 64, 32, 32, 32]
    assert [chunk_tokens(g * 4, 4, "cuda") for g in (1, 2, 4, 5, 7, 8)] == [64, 64, 64, 32, 32, 32]
    assert _chunk(paged_attention_func(AUTO, 32, 4, 128, 16, "float16", "decode")) == 32
    with pytest.raises(ValueError, match="multiple of 8"):
        paged_attention_func(AUTO, 4, 2, 16, 4, "float32", "decode", chunk=12)


def test_a_cpu_build_defines_the_cpu_chunk_whatever_the_group():
    """Defined under an llvm target (as the compiler imports a decoder for the CPU), the attention has
    CPU_CHUNK_TOKENS positions per chunk; under a cuda target or none, the GPU's 64 / 32."""
    assert CPU_CHUNK_TOKENS % 8 == 0 and CPU_CHUNK_TOKENS not in (32, 64)
    assert [chunk_tokens(g * 4, 4, "llvm") for g in (1, 4, 8)] == [CPU_CHUNK_TOKENS] * 3
    with CPU:
        assert [chunk_tokens(g * 4, 4) for g in (1, 4, 8)] == [CPU_CHUNK_TOKENS] * 3
        assert _chunk(paged_attention_func(AUTO, 32, 4, 128, 16, "float32", "decode")) == CPU_CHUNK_TOKENS
        assert _chunk(paged_attention_func(AUTO, 32, 4, 128, 16, "float32", "decode", chunk=16)) == 16
    with tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}):
        assert _chunk(paged_attention_func(AUTO, 32, 4, 128, 16, "float16", "decode")) == 32
        assert _chunk(paged_attention_func(AUTO, 32, 16, 128, 16, "float16", "decode")) == 64


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, phase, new",
    [
        (16, 2, 128, "decode", [1, 1, 1, 1, 1]),  # G8, the gathered key tile
        (8, 2, 32, "prefill", [4, 2, 1, 3, 1]),  # G4, keys read in place; rows on both sides of a chunk edge
    ],
)
def test_cpu_chunks_over_long_contexts_match_numpy_and_rerun_bit_identical(heads, kv_heads, head_dim, phase, new):
    """The CPU's long chunks over contexts of 1 to 9 of them: the last one partial, one of a single
    position (1025 = 8 x 128 + 1), one short of full (255), and chunk counts that do not divide among the
    2 threads. The kernel built as the compiler builds it for the CPU agrees with softmax attention (numpy,
    float64) and with the chunked form at its chunk; a rerun gives the same bits."""
    rng = np.random.default_rng(head_dim + heads)
    lengths = [1025, 130, 5, 1000, 255]
    batch = paged_batch(rng, heads, kv_heads, head_dim, 16, lengths, new)
    with CPU:
        func = paged_attention_func(AUTO, heads, kv_heads, head_dim, 16, "float32", phase)
    assert _chunk(func) == CPU_CHUNK_TOKENS
    lib = _build({phase: func}, CPU)
    outs = []
    for _ in range(2):
        out = tvm.runtime.tensor(np.full(batch.q.shape, np.nan, np.float32))
        lib[phase](*_tensors(*batch.arrays()), batch.layer, out)
        outs.append(out.numpy())
    np.testing.assert_allclose(outs[0], attention_reference(batch), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(outs[0], chunked_attention_reference(batch, CPU_CHUNK_TOKENS), rtol=2e-6, atol=2e-6)
    assert np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32))


def test_attention_is_deterministic(cpu_kernels):
    dtype, lib = cpu_kernels
    rng = np.random.default_rng(2)
    pool, block_table, positions, seq_slot, q, _, _ = _ragged_batch(rng, dtype)
    results = []
    for _ in range(3):
        out = tvm.runtime.empty(q.shape, dtype)
        lib["prefill"](*_tensors(q, pool, positions, seq_slot, block_table), LAYER, out)
        results.append(out.numpy())
    assert all(np.array_equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_cuda_schedule_builds_a_fatbin(arch, tmp_path):
    from tensorpress.compiler.cuda.toolchain import ensure_cuda_build_support, library_has_gpu_binary

    ensure_cuda_build_support()
    funcs = {
        "append": kv_append_func(AUTO, 8, 128, 16, "float16"),
        "prefill": paged_attention_func(AUTO, 32, 8, 128, 16, "float16", "prefill"),
        "decode": paged_attention_func(AUTO, 32, 8, 128, 16, "float16", "decode"),
    }
    lib = _build(funcs, tvm.target.Target({"kind": "cuda", "arch": arch}))
    source = lib.mod.imports[0].inspect_source("cuda")
    for name in ("append", "prefill", "decode"):
        assert f"{name}_kernel" in source
    path = tmp_path / "kv.so"
    lib.export_library(str(path))
    assert library_has_gpu_binary(path)


@pytest.mark.gpu
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_cuda_attention_matches_numpy(phase):
    lib = _build(
        {
            "append": kv_append_func(AUTO, KVH, D, PS, "float16"),
            phase: paged_attention_func(AUTO, H, KVH, D, PS, "float16", phase),
        },
        tvm.target.Target({"kind": "cuda", "arch": "sm_" + tvm.cuda(0).compute_version.replace(".", "")}),
    )
    dev = tvm.cuda(0)
    rng = np.random.default_rng(3)
    pool, block_table, positions, seq_slot, q, k, v = _ragged_batch(rng, "float16")
    if phase == "decode":
        keep = np.array([2, 6])
        positions, seq_slot, q, k, v = positions[keep], seq_slot[keep], q[keep], k[keep], v[keep]
    on_gpu = lambda a: tvm.runtime.tensor(a, dev)
    pool_t = on_gpu(pool)
    lib["append"](pool_t, on_gpu(k), on_gpu(v), on_gpu(positions), on_gpu(seq_slot), on_gpu(block_table), LAYER)
    expected_pool = _numpy_append(pool, block_table, positions, seq_slot, k, v)
    np.testing.assert_array_equal(pool_t.numpy(), expected_pool)
    out = tvm.runtime.empty(q.shape, "float16", dev)
    lib[phase](on_gpu(q), pool_t, on_gpu(positions), on_gpu(seq_slot), on_gpu(block_table), LAYER, out)
    expected = _numpy_attention(q, expected_pool, block_table, positions, seq_slot)
    np.testing.assert_allclose(out.numpy().astype(np.float64), expected, rtol=2e-3, atol=2e-3)
