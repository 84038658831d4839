"""Paged attention over the quantised KV caches (int8, int4): on the CPU against numpy attention over the
dequantised cache, the CUDA schedule built for sm_80 / sm_90a with nvcc, and its CPU replay against the
same reference (the append's too, against the format's numpy quantize)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from kv_reference import attention_reference, paged_batch
from tvm.s_tir import dlight as dl

from tensorpress.compiler.formats import get_kv_cache_format
from tensorpress.schedules.kv_attention import kv_append_func, kv_attention_rules, paged_attention_func
from tensorpress.schedules.kv_attention_cuda import schedule_append, schedule_attention
from tensorpress.schedules.verification.kv_attention_replay import build_replay

QUANTISED = ["int8", "int4"]


def quantised_batch(fmt, rng, heads, kv_heads, head_dim, page_size, lengths, new, dtype="float32"):
    """A paged batch whose pool is stored in `fmt`: its stored arrays (page-major) and the batch over the
    dequantised pool."""
    batch = paged_batch(rng, heads, kv_heads, head_dim, page_size, lengths, new, dtype)
    rows = batch.pool.reshape(-1, head_dim)
    stored = fmt.quantize(rows, dtype)
    stored = [a.reshape(*batch.pool.shape[:-1], *a.shape[1:]) for a in stored]
    batch.pool = fmt.dequantize(stored, dtype)  # what the kernel reads
    return batch, stored


def _run(lib, name, batch, stored):
    out = tvm.runtime.tensor(np.full(batch.q.shape, np.nan, batch.q.dtype))
    args = [batch.q, *stored, batch.positions, batch.seq_slot, batch.block_table]
    lib[name](*[tvm.runtime.tensor(a) for a in args], batch.layer, out)
    return out.numpy()


@pytest.mark.parametrize("name", QUANTISED)
@pytest.mark.parametrize("heads, kv_heads, head_dim, phase", [(4, 2, 16, "decode"), (6, 1, 128, "prefill")])
def test_cpu_attention_over_quantised_pages_matches_numpy_over_the_dequantised_cache(
    name, heads, kv_heads, head_dim, phase
):
    fmt = get_kv_cache_format(name)
    rng = np.random.default_rng(heads)
    new = [1, 1, 1, 1] if phase == "decode" else [5, 3, 2, 1]
    batch, stored = quantised_batch(fmt, rng, heads, kv_heads, head_dim, 4, [150, 3, 64, 65], new)
    func = paged_attention_func(fmt, heads, kv_heads, head_dim, 4, "float32", phase).with_attr("global_symbol", phase)
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    with target:
        mod = dl.ApplyDefaultSchedule(*kv_attention_rules())(tvm.IRModule({phase: func}))
        lib = tvm.compile(mod, target=target)
    np.testing.assert_allclose(_run(lib, phase, batch, stored), attention_reference(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", QUANTISED)
def test_cuda_schedule_replayed_on_the_cpu_matches_numpy(name):
    fmt = get_kv_cache_format(name)
    rng = np.random.default_rng(3)
    batch, stored = quantised_batch(fmt, rng, 4, 2, 16, 4, [150, 3, 64, 65, 90], [1] * 5)
    func = schedule_attention(paged_attention_func(fmt, 4, 2, 16, 4, "float32", "decode")).mod["main"]
    mod = tvm.IRModule({"attention": func.with_attr("global_symbol", "attention")})
    expected = attention_reference(batch)
    for seed in (None, 1):
        out = _run(build_replay(mod, seed), "attention", batch, stored)
        np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5, err_msg=f"seed {seed}")


@pytest.mark.parametrize("name", QUANTISED)
def test_cuda_append_replayed_on_the_cpu_writes_the_reference_codes(name):
    fmt = get_kv_cache_format(name)
    rng = np.random.default_rng(4)
    k, v = (rng.standard_normal((5, 2, 16)).astype(np.float32) for _ in range(2))
    positions, seq_slot = np.array([0, 1, 2, 3, 4], np.int32), np.zeros(5, np.int32)
    block_table = np.array([[2, 0]], np.int32)
    func = schedule_append(kv_append_func(fmt, 2, 16, 4, "float32")).mod["main"]
    lib = build_replay(tvm.IRModule({"append": func.with_attr("global_symbol", "append")}), seed=2)
    cache = [
        np.zeros([3 if d == "num_pages" else d for d in t.shape], t.dtype)
        for t in fmt.cache_tensors(1, 2, 4, 16, "float32")
    ]
    tensors = [tvm.runtime.tensor(a) for a in (*cache, k, v, positions, seq_slot, block_table)]
    lib["append"](*tensors, 0)
    for i, p in enumerate(positions):
        page, row = block_table[0, p // 4], p % 4
        for kv, x in ((0, k[i]), (1, v[i])):
            for written, expected in zip(tensors, fmt.quantize(x, "float32")):
                np.testing.assert_array_equal(written.numpy()[0, page, kv, :, row], expected)


@pytest.mark.parametrize("name", QUANTISED)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_the_quantised_cuda_kernels_build_a_fatbin_without_spills(name, arch, tmp_path):
    from tensorpress.compiler.cuda.toolchain import ensure_cuda_build_support, library_has_gpu_binary
    from tensorpress.schedules.verification.cuda_inspection import inspect_cuda

    ensure_cuda_build_support()
    fmt = get_kv_cache_format(name)
    funcs = {
        "append": kv_append_func(fmt, 8, 128, 16, "float16"),
        "decode": paged_attention_func(fmt, 32, 8, 128, 16, "float16", "decode"),
    }
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
    with target:
        mod = dl.ApplyDefaultSchedule(*kv_attention_rules())(mod)
        lib = tvm.compile(mod, target=target)
    path = tmp_path / f"kv_{name}.so"
    lib.export_library(str(path))
    assert library_has_gpu_binary(path)
    scheduled = tvm.IRModule(
        {
            "attention": schedule_attention(funcs["decode"]).mod["main"].with_attr("global_symbol", "attention"),
            "append": schedule_append(funcs["append"]).mod["main"].with_attr("global_symbol", "append"),
        }
    )
    for report in inspect_cuda(scheduled, arch):
        assert report.spill_bytes == 0 and report.sass["LDL"] == 0, report.summary()
