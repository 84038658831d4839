"""The SASS cost table's trip counts of the bit scatter (benchmarks/gemm_sass.py `scatter_trips`): per
bitmap word of a group, the busiest lane's set bits rounded up to whole chunks (the loop runs ceil(bits / chunk)
trips, a chunk's stores each), counted from the dense mask by numpy, for chunks 1 (a bit a trip) to 4."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.gemm_sass import scatter_trips  # noqa: E402
from tensorpress.compiler.formats import bitmap as bitmap_format  # noqa: E402
from tensorpress.compiler.formats import get_weight_format  # noqa: E402
from tensorpress.schedules.tensorcore.tile_config import TileConfig  # noqa: E402

ONE_TILE = TileConfig(block_n=16, block_m=16, block_k=64, warps=1, stages=2)  # a 16 x 64 tile: 16 lanes, a row each


@pytest.mark.parametrize("chunk", [1, 2, 3, 4])
def test_word_trips_are_the_busiest_rows_bits_in_whole_chunks(monkeypatch, chunk):
    monkeypatch.setattr(bitmap_format, "SCATTER_CHUNK", chunk)
    rng = np.random.default_rng(chunk)
    w = np.where(rng.random((16, 128)) < 0.3, rng.standard_normal((16, 128)), 0).astype(np.float32)
    fmt = get_weight_format("bitmap")
    packed = fmt.pack(w)
    scatter = fmt.decode_stage().tile_scatter
    assert scatter is not None and scatter.set_bits is not None and scatter.set_bits.chunk == chunk
    trips = scatter_trips(scatter, list(packed.arrays.values()), 16, 128, ONE_TILE)
    # K tile c: lane r takes row r; its words are columns [64c, 64c + 32) and [64c + 32, 64c + 64)
    per_word = (w != 0).reshape(16, 2, 2, 32).sum(axis=3)  # [row, K tile, word]
    stores = -(-per_word // chunk) * chunk
    # per word of a lane's group (each word's loop is its own loop in the SASS), K tiles averaged: the
    # busiest lane's stores
    expected = stores.max(axis=0).mean()
    assert trips.word_elements == pytest.approx(expected)
    assert trips.groups == pytest.approx(1.0)  # one group (a tile row) a lane
