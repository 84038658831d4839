"""int8-query scores (`schedules/cpu/int8_query_scores.py`): the CPU kernel of int2-kitty and int2-oscar with
q·k over 2-bit pages as integer dot products, against a numpy model of the scores its docstring defines
(`kv_reference.int8_query_scores_reference`: q, or q·a per channel, rounded to int8 by its own absmax,
times the codes, exact integer sums, then the scale and the bias), over caches mixing full-precision and
quantised pages; decode and prefill, GQA 4 and 8, partial chunks, reruns bit-identical; the shapes it
cannot take fall back to the plain kernel; the option's Python and CLI surface."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tvm
from kv_reference import attention_reference, int8_query_attention_reference, paged_batch
from test_kv_attention_page_quantised import mixed_cache
from tvm.s_tir import dlight as dl

from tensorpress.compiler.compression_configs import KVCacheConfig
from tensorpress.compiler.formats.kv_int2_kitty import Int2KittyKVCache
from tensorpress.compiler.formats.kv_int2_oscar import Int2OscarKVCache
from tensorpress.errors import ConfigError
from tensorpress.schedules.cpu.int8_query_scores import packed_position, permuted
from tensorpress.schedules.kv_attention import kv_attention_rules, paged_attention_func

TARGET = {"kind": "llvm", "num-cores": 2, "mcpu": "x86-64-v3"}


def _build(fmt, heads, kv_heads, head_dim, page_size, phase):
    """Defined and built for the CPU as the compiler does (x86-64-v3, the CPU's chunks)."""
    target = tvm.target.Target(TARGET)
    with target:
        func = paged_attention_func(fmt, heads, kv_heads, head_dim, page_size, "float32", phase)
        mod = dl.ApplyDefaultSchedule(*kv_attention_rules())(
            tvm.IRModule({phase: func.with_attr("global_symbol", phase)})
        )
        blocks = str(mod)
        return tvm.compile(mod, target=target)[phase], blocks


def _run(kernel, batch, tagged, stored):
    out = tvm.runtime.tensor(np.full(batch.q.shape, np.nan, batch.q.dtype))
    args = [batch.q, batch.pool, *stored, batch.positions, batch.seq_slot, tagged]
    kernel(*[tvm.runtime.tensor(a) for a in args], batch.layer, out)
    return out.numpy()


FORMATS = {
    "int2-kitty": Int2KittyKVCache(boost_fraction=0.25, sink=16, window=32, page_tokens=32, int8_query=True),
    "int2-kitty-boost-0.125": Int2KittyKVCache(
        boost_fraction=0.125, sink=16, window=32, page_tokens=32, int8_query=True
    ),
    "int2-kitty-no-boost": Int2KittyKVCache(boost_fraction=0.0, sink=16, window=32, page_tokens=64, int8_query=True),
    "int2-oscar": Int2OscarKVCache(sink=16, window=32, int8_query=True),
}


G4, G8 = (8, 2, "decode", [1, 1, 1, 1, 1]), (16, 2, "decode", [1, 1, 1, 1, 1])
PREFILL = (8, 1, "prefill", [5, 1, 3, 2, 1])
SLOW = pytest.mark.slow  # the default run keeps one case of each format and path


@pytest.mark.parametrize(
    "name, heads, kv_heads, phase, new, head_dim",
    [
        ("int2-kitty", *G8, 128),
        ("int2-kitty", *PREFILL, 128),
        ("int2-kitty-no-boost", *G4, 128),
        ("int2-oscar", *G8, 128),
        ("int2-oscar", *PREFILL, 128),
        # a partial last chunk of the row (96: 6 words) and of kitty's high plane (24 channels: 6 bytes)
        ("int2-kitty", *G4, 96),
        pytest.param("int2-oscar", *PREFILL, 32, marks=SLOW),  # paired rows: the kitty case at 64 runs by default
        ("int2-kitty", *G4, 64),  # two rows a vector (head_dim <= 64), kitty's 16 boosted channels: 4 bytes a row
        pytest.param("int2-kitty", *G4, 128, marks=SLOW),
        pytest.param("int2-kitty-no-boost", *G8, 128, marks=SLOW),
        pytest.param("int2-kitty-no-boost", *PREFILL, 128, marks=SLOW),
        pytest.param("int2-oscar", *G4, 128, marks=SLOW),
        pytest.param("int2-kitty-boost-0.125", *G8, 128, marks=SLOW),  # 16 boosted channels: 4 bytes
        pytest.param("int2-kitty", *PREFILL, 32, marks=SLOW),  # the demo's head_dim: 2 words, 2 high bytes
        pytest.param("int2-kitty-boost-0.125", *G4, 192, marks=SLOW),  # a whole chunk, then 4 words
        pytest.param("int2-oscar", *G8, 64, marks=SLOW),
        pytest.param("int2-kitty-boost-0.125", *PREFILL, 64, marks=SLOW),  # paired rows, 2 high bytes a row
        pytest.param("int2-kitty-no-boost", *G8, 32, marks=SLOW),
    ],
)
def test_int8_query_scores_match_their_numpy_definition_over_mixed_pages(name, heads, kv_heads, phase, new, head_dim):
    """Contexts of 20 to 420 tokens (pages of 16; chunks of 128 that end partial, mixing the sink's and the
    window's full-precision pages with 2-bit ones); channels of uneven scale so the boost and the query's
    rounding matter. The kernel equals the int8-query definition to float32 rounding, differs from fp32
    q·k over the dequantised keys (the integer path ran) by no more than the query's rounding allows,
    and reruns bit for bit."""
    fmt = FORMATS[name]
    rng = np.random.default_rng(len(name) + heads + head_dim)
    batch = paged_batch(rng, heads, kv_heads, head_dim, 16, [420, 20, 300, 129, 257], new)
    batch.pool *= rng.uniform(0.2, 4, head_dim).astype(np.float32)
    tagged, stored, quantised_pages = mixed_cache(fmt, batch, sink_pages=1, window_pages=2)
    assert quantised_pages > 0
    kernel, ir = _build(fmt, heads, kv_heads, head_dim, 16, phase)
    assert "q_prepared" in ir and "pmadd.ub.sw" in ir
    out = _run(kernel, batch, tagged, stored)
    np.testing.assert_allclose(out, int8_query_attention_reference(fmt, batch, tagged, stored), rtol=2e-5, atol=2e-5)
    exact = attention_reference(batch)  # fp q·k over the same dequantised keys
    moved = np.abs(out - exact).max()
    assert 1e-5 < moved < 0.1 * np.abs(exact).max(), moved
    assert np.array_equal(_run(kernel, batch, tagged, stored).view(np.uint32), out.view(np.uint32))


def test_int8_query_moves_the_scores_far_less_than_the_2bit_keys_do():
    """What the option costs, on one synthetic case: the attention output's error against fp32 keys, with
    and without rounding q to int8, over int2-oscar pages. The int8 query adds a small fraction of it."""
    fmt = FORMATS["int2-oscar"]
    rng = np.random.default_rng(3)
    batch = paged_batch(rng, 8, 2, 128, 16, [400, 333], [1, 1])
    original = attention_reference(batch)
    tagged, stored, _ = mixed_cache(fmt, batch, sink_pages=1, window_pages=2)
    two_bit = np.abs(attention_reference(batch) - original).mean()
    with_int8_query = np.abs(int8_query_attention_reference(fmt, batch, tagged, stored) - original).mean()
    assert with_int8_query < 1.1 * two_bit, (with_int8_query, two_bit)


@pytest.mark.parametrize("head_dim, boost", [(40, 0.0)])
def test_shapes_the_block_cannot_take_build_the_plain_kernel(head_dim, boost):
    """head_dim 40 (the block reads rows of whole 4-byte words: 16 channels) keeps the fp32 q·k: the same
    kernel as without the option, bit for bit."""
    asked = Int2KittyKVCache(boost_fraction=boost, sink=16, window=32, page_tokens=32, int8_query=True)
    plain = Int2KittyKVCache(boost_fraction=boost, sink=16, window=32, page_tokens=32, int8_query=False)
    rng = np.random.default_rng(head_dim)
    batch = paged_batch(rng, 8, 2, head_dim, 16, [200, 90], [1, 1])
    tagged, stored, _ = mixed_cache(plain, batch, sink_pages=1, window_pages=2)
    (kernel, ir), (plain_kernel, _) = (_build(f, 8, 2, head_dim, 16, "decode") for f in (asked, plain))
    assert "q_prepared" not in ir
    out = _run(kernel, batch, tagged, stored)
    assert np.array_equal(out.view(np.uint32), _run(plain_kernel, batch, tagged, stored).view(np.uint32))


def test_the_packed_query_order_is_a_permutation_and_its_inverse():
    assert sorted(permuted(p) for p in range(256)) == list(range(256))
    assert all(packed_position(permuted(p)) == p for p in range(256))


def test_the_option_defaults_to_where_it_is_faster_reaches_the_format_and_is_refused_where_it_does_not_apply(
    tmp_path,
):
    for name in ("int2-kitty", "int2-oscar"):
        for int8_query in (None, True, False):
            assert KVCacheConfig(name, int8_query=int8_query).kv_cache_format().int8_query is int8_query
    # the CPU definition has the int8-query blocks: by default at head_dim 128 and 64, not 32; asked for, at 32
    with tvm.target.Target(TARGET):
        for int8_query, head_dim, blocks in (
            (None, 128, True),
            (None, 64, True),
            (None, 32, False),
            (True, 32, True),
            (False, 128, False),
        ):
            fmt = KVCacheConfig("int2-kitty", int8_query=int8_query).kv_cache_format()
            func = paged_attention_func(fmt, 8, 2, head_dim, 16, "float32", "decode")
            assert ("q_prepared" in str(func)) is blocks, (int8_query, head_dim)
    with pytest.raises(ConfigError, match="page-granular"):
        KVCacheConfig("int4", int8_query=True)
    for flag in ("--kv-int8-query", "--no-kv-int8-query"):
        result = subprocess.run(
            [sys.executable, "-m", "tensorpress", "compile", "examples/tiny_llama", "-o", str(tmp_path / "a.tpk"),
             "--kv-cache-dtype", "int4", flag],
            capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode != 0 and f"{flag} applies to" in result.stderr
        assert not list(tmp_path.iterdir())
