"""The kit's parallel bitmap packing (benchmarks/kit/sparse_weights.py): packing row bands and joining
them gives the compiler's packer's arrays bit for bit, and the random prune keeps the asked count per row."""

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
    assert padded["plane4"].shape == (1, capacity // 8) and padded["plane2"].shape == (1, capacity // 16)
    grown = {**whole.arrays, "plane4": padded["plane4"], "plane2": padded["plane2"]}
    np.testing.assert_array_equal(fmt.unpack(type(whole)(whole.format, whole.shape, grown)), fmt.unpack(whole))
    with pytest.raises(ValueError, match="do not fit"):
        sparse_weights.BandPacker(0).pack_fpx(w, capacity=128)
