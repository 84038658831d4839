"""The CUDA schedule of the paged attention reading int2-kitty pages (2-bit, dequantised in registers as
they are gathered, beside the full-precision sink and window pages): replayed on the CPU with shuffled
threads and NaN-poisoned scratch against numpy attention over the dequantised cache, three planted bugs
in the 2-bit read (wrong channel index, wrong zero point, a quantised page off by one) caught by the same
replay, and the attention and page-quantise kernels of int2-kitty and int2-oscar built for sm_80 and
sm_90a by nvcc without spills."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from kv_reference import attention_reference, paged_batch
from test_kv_attention_page_quantised import mixed_cache
from tvm import tirx
from tvm.s_tir import dlight as dl

from tensorpress.compiler.formats.kv_int2_kitty import Int2KittyKVCache
from tensorpress.schedules.kv_attention import kv_attention_rules, kv_quantize_pages_func, paged_attention_func
from tensorpress.schedules.kv_attention_cuda import schedule_attention, schedule_quantize_pages
from tensorpress.schedules.verification.kv_attention_replay import build_replay

OPTIONS = {"sink": 8, "window": 16, "page_tokens": 32}


class WrongChannel(Int2KittyKVCache):
    def read_quantised(self, quantised, layer, page, kv, head, row, d, dtype):
        return super().read_quantised(quantised, layer, page, kv, head, row, tirx.floormod(d + 1, 32), dtype)


class WrongZeroPoint(Int2KittyKVCache):
    def read_quantised(self, quantised, layer, page, kv, head, row, d, dtype):
        value = super().read_quantised(quantised, layer, page, kv, head, row, d, "float32")
        return (value - quantised[3][layer, page, head, d, 0].astype("float32")).astype(dtype)  # keys' min lost


class PageOffByOne(Int2KittyKVCache):
    def read_quantised(self, quantised, layer, page, kv, head, row, d, dtype):
        return super().read_quantised(quantised, layer, page + 1, kv, head, row, d, dtype)


def _replay_module(formats: dict):
    funcs = {
        name: schedule_attention(paged_attention_func(fmt, 4, 2, 32, 8, "float32", "decode")).mod["main"]
        for name, fmt in formats.items()
    }
    return tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})


def _run(lib, name, batch, tagged, stored):
    out = tvm.runtime.tensor(np.full(batch.q.shape, np.nan, batch.q.dtype))
    args = [batch.q, batch.pool, *stored, batch.positions, batch.seq_slot, tagged]
    lib[name](*[tvm.runtime.tensor(a) for a in args], batch.layer, out)
    return out.numpy()


def test_the_cuda_schedule_replayed_with_shuffled_threads_matches_numpy_and_catches_planted_bugs():
    formats = {
        "correct": Int2KittyKVCache(**OPTIONS),
        "wrong_channel": WrongChannel(**OPTIONS),
        "wrong_zero_point": WrongZeroPoint(**OPTIONS),
        "page_off_by_one": PageOffByOne(**OPTIONS),
    }
    rng = np.random.default_rng(5)
    batch = paged_batch(rng, 4, 2, 32, 8, [20, 61, 130, 190], [1, 1, 1, 1])
    batch.pool *= rng.uniform(0.2, 4, 32).astype(np.float32)
    tagged, stored, quantised_pages = mixed_cache(formats["correct"], batch, sink_pages=1, window_pages=2)
    # one more quantised page after the last, so that a page off by one reads real (other) codes
    extra = [np.concatenate([a, a[:, 1:2]], axis=1) for a in stored]
    expected = attention_reference(batch)
    lib = build_replay(_replay_module(formats), seed=1)
    np.testing.assert_allclose(_run(lib, "correct", batch, tagged, extra), expected, rtol=2e-5, atol=2e-5)
    for bug in ("wrong_channel", "wrong_zero_point", "page_off_by_one"):
        out = _run(lib, bug, batch, tagged, extra)
        assert not np.allclose(out, expected, rtol=1e-3, atol=1e-3), f"the replay missed the planted bug {bug}"
    assert quantised_pages == 9


@pytest.mark.slow  # nvcc: about 20 s a case
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("name", ["int2-kitty", "int2-oscar"])
def test_the_page_quantised_cuda_kernels_build_a_fatbin_without_spills(name, arch, tmp_path):
    from tensorpress.compiler.cuda.toolchain import ensure_cuda_build_support, library_has_gpu_binary
    from tensorpress.compiler.formats import get_kv_cache_format
    from tensorpress.schedules.verification.cuda_inspection import inspect_cuda

    ensure_cuda_build_support()
    fmt = get_kv_cache_format(name)
    funcs = {
        "decode": paged_attention_func(fmt, 32, 8, 128, 16, "float16", "decode"),
        "quantize": kv_quantize_pages_func(fmt, 8, 128, 16, "float16"),
    }
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
    with target:
        lib = tvm.compile(dl.ApplyDefaultSchedule(*kv_attention_rules())(mod), target=target)
    path = tmp_path / f"kv_{name}.so"
    lib.export_library(str(path))
    assert library_has_gpu_binary(path)
    scheduled = tvm.IRModule(
        {
            "attention": schedule_attention(funcs["decode"]).mod["main"].with_attr("global_symbol", "attention"),
            "quantize": schedule_quantize_pages(funcs["quantize"]).mod["main"].with_attr("global_symbol", "quantize"),
        }
    )
    reports = inspect_cuda(scheduled, arch)
    assert any(r.name.startswith("attention") for r in reports)
    for report in reports:
        assert report.spill_bytes == 0 and report.sass["LDL"] == 0, report.summary()
