"""The kit's parallel bitmap packing (benchmarks/kit/sparse_weights.py): packing row bands and joining
them gives the compiler's packer's arrays bit for bit, the random prune keeps the asked count per row, and
the Wanda masks are Wanda's choice over their drawn channel norms, with the uneven tiles they are there for."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.kit import sparse_weights  # noqa: E402
from benchmarks.kit.cases import bitmap_value_capacity, kept_per_row  # noqa: E402
from tensorpress.compiler.formats import get_weight_format  # noqa: E402

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("m, k, sparsity", [(100, 200, 0.7), (64, 64, 0.5), (17, 130, 0.9)])
def test_band_packing_equals_the_whole_weight_packed_at_once(monkeypatch, m, k, sparsity):
    monkeypatch.setattr(sparse_weights, "BAND_ROWS", 32)  # several bands, the last one short
    w = sparse_weights.random_pruned(m, k, sparsity, torch.device("cpu"), seed=m).numpy()
    assert (np.count_nonzero(w, axis=1) == kept_per_row(k, sparsity)).all()
    whole = get_weight_format("bitmap").pack(w).arrays
    joined = sparse_weights.BandPacker(0).pack(w)
    for name in ("bits", "offsets", "values"):
        assert joined[name].dtype == whole[name].dtype and np.array_equal(joined[name], whole[name]), name
    padded = sparse_weights.BandPacker(0).pack(w, capacity=bitmap_value_capacity(m, k))
    assert padded["values"].size == bitmap_value_capacity(m, k)
    assert np.array_equal(padded["values"][: whole["values"].size], whole["values"])
    assert not padded["values"][whole["values"].size :].any()


@pytest.mark.parametrize("m, k, sparsity", [(100, 200, 0.7), (17, 130, 0.0)])
def test_tiled_csl_band_packing_equals_the_whole_weight_packed_at_once(monkeypatch, m, k, sparsity):
    from tensorpress.compiler.formats.tiled_csl import pack_tiled_csl, unpack_tiled_csl

    monkeypatch.setattr(sparse_weights, "BAND_ROWS", 32)  # several bands, the last one short
    w = sparse_weights.random_pruned(m, k, sparsity, torch.device("cpu"), seed=m).numpy()
    whole = pack_tiled_csl(w)
    joined = sparse_weights.BandPacker(0).pack_tiled_csl(w)
    for name in ("words", "offsets"):
        assert joined[name].dtype == whole[name].dtype and np.array_equal(joined[name], whole[name]), name
    padded = sparse_weights.BandPacker(0).pack_tiled_csl(w, capacity=whole["words"].size + 8)
    assert np.array_equal(padded["words"][: whole["words"].size], whole["words"]) and not padded["words"][-8:].any()
    exact = w.astype(np.float32)
    np.testing.assert_array_equal(unpack_tiled_csl(joined, m, k), exact)
    with pytest.raises(ValueError, match="do not fit"):
        sparse_weights.BandPacker(0).pack_tiled_csl(w, capacity=whole["words"].size - 4)


def test_a_capacity_too_small_for_the_nonzeros_is_refused():
    w = sparse_weights.random_pruned(32, 64, 0.5, torch.device("cpu"), seed=0).numpy()
    with pytest.raises(ValueError, match="do not fit"):
        sparse_weights.BandPacker(0).pack(w, capacity=8)


@pytest.mark.parametrize("m, k", [(100, 200), (17, 130)])
def test_fpx_band_packing_equals_the_whole_weight_packed_at_once(monkeypatch, m, k):
    from benchmarks.kit.cases import bitmap_fpx_stream_capacity
    from tensorpress.compiler.formats.bitmap_fpx import stream_length

    monkeypatch.setattr(sparse_weights, "BAND_ROWS", 32)
    w = sparse_weights.random_pruned(m, k, 0.8, torch.device("cpu"), seed=m).numpy()
    fmt = get_weight_format("bitmap-e3m2")
    whole = fmt.pack(w.astype(np.float32))
    joined = sparse_weights.BandPacker(0).pack_fpx(w)
    for name, array in whole.arrays.items():
        assert joined[name].dtype == array.dtype and np.array_equal(joined[name], array), name
    np.testing.assert_array_equal(joined["exact"], fmt.unpack(whole))
    capacity = bitmap_fpx_stream_capacity(m, k, (0.5,))
    padded = sparse_weights.BandPacker(0).pack_fpx(w, capacity)
    assert padded["codes"].shape == (1, capacity * 6 // 32)
    grown = {**whole.arrays, "codes": padded["codes"]}
    np.testing.assert_array_equal(fmt.unpack(type(whole)(whole.format, whole.shape, grown)), fmt.unpack(whole))
    with pytest.raises(ValueError, match="do not fit"):
        sparse_weights.BandPacker(0).pack_fpx(w, capacity=128)
    # room for the nonzeros but not for the spare codes a window reads past the last one, or not whole words
    needed = stream_length(int(np.unpackbits(whole.arrays["bits"].view(np.uint8)).sum()))  # nonzero codes
    for short in (needed - 32, needed + 16):
        with pytest.raises(ValueError, match="do not fit"):
            sparse_weights.BandPacker(0).pack_fpx(w, short)


@pytest.mark.parametrize("m, k", [(100, 200), (48, 1024), (17, 130)])
def test_tiled_csl_word_capacity_holds_the_densest_sparsitys_words(m, k):
    from benchmarks.kit.cases import tiled_csl_word_capacity

    capacity = tiled_csl_word_capacity(m, k, (0.5, 0.8))
    assert capacity % 4 == 0
    for seed in range(3):  # random masks, each row keeping exactly kept_per_row(k, 0.5)
        w = sparse_weights.random_pruned(m, k, 0.5, torch.device("cpu"), seed=seed).numpy()
        words = get_weight_format("tiled-csl").pack(w).arrays["words"].size
        assert words <= capacity < words + 4 * 3 * -(-m // 16) * -(-k // 64) + 4


def test_tiled_csl_word_capacity_holds_a_weight_padded_by_3_words_in_every_tile():
    from benchmarks.kit.cases import kept_per_row, tiled_csl_word_capacity

    m, k, sparsity = 16, 256, 0.8  # 51 kept a row, in 4 tiles: 13, 13, 13, 12 but for 3 rows
    per_tile = np.tile([13, 13, 13, 12], (m, 1))
    for row in range(3):  # the tiles then hold 209, 209, 209, 189 nonzeros: each 1 more than a multiple of 4
        per_tile[row, row] += 1
        per_tile[row, 3] -= 1
    w = np.zeros((m, k), np.float16)
    for row in range(m):
        for tile in range(4):
            w[row, tile * 64 : tile * 64 + per_tile[row, tile]] = 1.0
    assert (np.count_nonzero(w, axis=1) == kept_per_row(k, sparsity)).all()
    words = get_weight_format("tiled-csl").pack(w).arrays["words"].size
    assert words == m * kept_per_row(k, sparsity) + 4 * 3 == tiled_csl_word_capacity(m, k, (sparsity,))


@pytest.mark.parametrize("m, k", [(128, 256), (48, 208)])
def test_the_kits_tiled_csl_buffers_are_what_the_format_packs_at_the_kits_capacity(m, k):
    from benchmarks.kit.build import tiled_csl_buffers
    from benchmarks.kit.cases import tiled_csl_word_capacity

    w = sparse_weights.random_pruned(m, k, 0.8, torch.device("cpu"), seed=1).numpy()
    packed = get_weight_format("tiled-csl").pack(w)
    kit = tiled_csl_buffers(m, k)
    assert [(b.name, b.dtype) for b in kit] == [(b.name, b.dtype) for b in packed.buffers]
    assert kit[1].shape == packed.buffers[1].shape and kit[0].shape == (tiled_csl_word_capacity(m, k),)
    arrays = sparse_weights.BandPacker(0).pack_tiled_csl(w, tiled_csl_word_capacity(m, k))
    assert [(name, a.shape, str(a.dtype)) for name, a in arrays.items()] == [(b.name, b.shape, b.dtype) for b in kit]


def test_tiled_csl_candidates_are_bitmaps():
    from benchmarks.kit.build import bitmap_bench_cases, tiled_csl_bench_cases

    layers = {"llama2-70b q/o": (8192, 8192), "small": (128, 256)}
    csl, csl_defaults = tiled_csl_bench_cases(layers, (1, 16, 64), "sm_90a")
    bitmap, bitmap_defaults = bitmap_bench_cases(layers, (1, 16, 64), "sm_90a")
    assert [(c.m, c.k, c.config) for c in csl] == [(c.m, c.k, c.config) for c in bitmap]
    assert {c.fmt for c in csl} == {"tiled-csl"} and all(c.name.startswith("wg_tiled_csl_") for c in csl)
    renamed = {layer: {n: name.replace("wg_bitmap_", "wg_tiled_csl_") for n, name in d.items()}
               for layer, d in bitmap_defaults.items()}  # fmt: skip
    assert csl_defaults == renamed


def test_the_sparse_estimate_counts_tiled_csls_timings():
    from benchmarks.kit.budget import sparse_estimate

    spec = {"m": 8192, "k": 8192, "sparsities": [0.5, 0.8], "tokens": [1, 16], "candidates": ["a", "b"]}
    without = sparse_estimate({"layer": spec})
    csl = {"format": "tiled-csl", "sparsities": [0.8], "candidates": ["c", "d", "e"]}
    with_csl = sparse_estimate({"layer": {**spec, "tiled_csl": csl}})
    assert with_csl["timings"] == without["timings"] + 2 * 3
    assert with_csl["expected_s"] >= without["expected_s"] and with_csl["bound_s"] > without["bound_s"]


def test_wanda_masks_keep_each_rows_largest_w_times_channel_norm():
    m, k, sparsity, seed = 96, 1024, 0.8, 5
    w = sparse_weights.random_pruned(m, k, sparsity, torch.device("cpu"), seed, mask="wanda").numpy()
    full = sparse_weights.random_pruned(m, k, 0.0, torch.device("cpu"), seed).numpy()  # the same values, unpruned
    norms = sparse_weights.wanda_channel_norms(k, seed, torch.device("cpu")).numpy()
    keep = kept_per_row(k, sparsity)
    score = np.abs(full.astype(np.float32)) * norms
    expected = np.zeros_like(full, dtype=bool)
    np.put_along_axis(expected, np.argsort(-score, axis=1, kind="stable")[:, :keep], True, axis=1)
    np.testing.assert_array_equal(w != 0, expected)
    np.testing.assert_array_equal(w[expected], full[expected])
    # The outlier channels are kept in almost every row, and 16 x 64 tiles are less even than with a
    # random mask of the same count per row.
    outliers = norms > 5 * np.median(norms)
    assert outliers.sum() >= 2 and (w[:, outliers] != 0).mean() > 0.9
    random = sparse_weights.random_pruned(m, k, sparsity, torch.device("cpu"), seed).numpy()

    def tile_counts(x):
        return (x != 0).reshape(m // 16, 16, k // 64, 64).sum(axis=(1, 3))

    assert tile_counts(w).std() > 1.5 * tile_counts(random).std()
    with pytest.raises(ValueError, match="unknown mask"):
        sparse_weights.random_pruned(m, k, sparsity, torch.device("cpu"), seed, mask="2:4")


def test_the_sparse_estimate_counts_the_wanda_masks_timings():
    from benchmarks.kit.budget import sparse_estimate

    spec = {"m": 8192, "k": 8192, "sparsities": [0.5, 0.8], "tokens": [1, 16], "candidates": ["a", "b"]}
    without = sparse_estimate({"layer": spec})
    with_wanda = sparse_estimate({"layer": {**spec, "wanda": {"sparsities": [0.8], "tokens": [16]}}})
    assert with_wanda["timings"] == without["timings"] + 1 + 2  # cuBLAS and the two candidates at N = 16
    assert with_wanda["bound_s"] > without["bound_s"]


def test_a_kit_tiled_csl_kernel_reads_a_sparser_weight_from_its_padded_words():
    """One kit kernel (CPU replay), built for the densest sparsity's words, on a sparser weight."""
    import tvm

    from benchmarks.kit.build import scheduled_module
    from benchmarks.kit.cases import case, tiled_csl_word_capacity
    from tensorpress.schedules.tensorcore.tile_config import TileConfig
    from tensorpress.schedules.verification.cpu_replay import build_replay

    m, k, n = 48, 208, 5  # part tiles along M and K
    config = TileConfig(block_n=16, block_m=16, block_k=64, warps=1, stages=2)
    kernel_case = case("tiled-csl", m, k, config.to_dict())
    kernel = build_replay(scheduled_module([kernel_case], emulated=True), seed=None)[kernel_case.name]
    w = sparse_weights.random_pruned(m, k, 0.9, torch.device("cpu"), seed=3).numpy()
    arrays = sparse_weights.BandPacker(0).pack_tiled_csl(w, tiled_csl_word_capacity(m, k))
    x = np.random.default_rng(0).standard_normal((n, k)).astype(np.float16)
    y = np.full((n, m), np.nan, np.float16)
    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(a, dev) for a in (x, arrays["words"], arrays["offsets"], y)]
    kernel(*tensors)
    reference = x.astype(np.float32) @ w.astype(np.float32).T
    np.testing.assert_allclose(tensors[-1].numpy().astype(np.float32), reference, rtol=2e-3, atol=2e-3)
