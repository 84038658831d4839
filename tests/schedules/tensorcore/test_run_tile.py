"""Runs along K (`schedules/tensorcore/run_tile.py`, `decode_stage.py` "Runs along K"): the Tensor Core
template gives each thread whole runs of a decoded W-tile row and the stage decodes a run at once
(bitmap without its tile scatter and fragment decode, which the template prefers: the rank computed
once per run, then advanced one bit per weight). Replayed on the CPU against numpy where the K tiles
pad K (a run crossing K, a run past K), and planted bugs in the per-run rank (a rank that stops
advancing at a word's last bit, a row prefix one row short) fail the replay."""

from __future__ import annotations

import pytest
from tensorcore_cases import relative_error, replay_weight_gemm
from tvm import tirx

from tensorpress.compiler.formats import decode_stage
from tensorpress.compiler.formats.bitmap import TILE_ROWS, BitmapDecode, kept_if, tile_run
from tensorpress.schedules.tensorcore.run_tile import run_length
from tensorpress.schedules.tensorcore.tile_config import SHIPPED_TILES, TileConfig

TOLERANCE = 2e-3
SMALL = TileConfig(block_n=16, block_m=32, block_k=64, warps=2, stages=2)  # 32 runs of 64: one warp idle
NARROW = TileConfig(block_n=16, block_m=64, block_k=32, warps=2, stages=2)  # block_k 32: runs of 32, all busy


def test_run_length_fits_the_tile_in_whole_warps():
    stage = decode_stage("bitmap")
    assert [run_length(stage, c) for c in SHIPPED_TILES] == [64] * len(SHIPPED_TILES)  # a tile row a run
    assert (run_length(stage, SMALL), run_length(stage, NARROW)) == (64, 32)
    assert run_length(stage, TileConfig(block_n=16, block_m=16, block_k=32, warps=2, stages=2)) is None  # 16 runs
    assert run_length(decode_stage("fp6"), SHIPPED_TILES[0]) is None  # no k_runs: one weight a thread


@pytest.mark.parametrize("config", [SMALL, NARROW, SHIPPED_TILES[0]], ids=lambda c: c.label())
@pytest.mark.parametrize("k", [208, 240])  # K tiles pad K: runs of 64 cross K; 240: a run of 32 crosses it
def test_runs_crossing_k_match_numpy(config, k):
    out, ref = replay_weight_gemm("bitmap", 128, k, 9, config, seed=k, bias=True, stage=RUNS)
    assert relative_error(out, ref) < TOLERANCE


class _RunsOnly(BitmapDecode):
    """bitmap without its tile scatter and fragment decode (which the template prefers): its W tiles
    decoded in runs (a stage staging its bits would decode one weight a thread)."""

    fragment_k = None

    def __init__(self, name: str):
        super().__init__(name)
        self.tile_scatter = None

    def staged_buffers(self, m, k):
        return []


RUNS = _RunsOnly("test-bitmap-runs")


class _RankStopsAtWordEnd(_RunsOnly):
    """The rank does not advance past the last bit of the run's first word: weights of a row's second
    word (runs of 64) read the value before theirs when bit 31 is set."""

    def decode_run(self, stored, row, col0, length, dtype, bind):
        bits, offsets, values = stored
        bound = {}

        def keep(name, value):
            bound[name] = bind(name, value)
            return bound[name]

        is_set, index = tile_run(bits, offsets, row, col0, length, keep)
        index = [i - bound["bit31"].astype("int32") if n >= 32 else i for n, i in enumerate(index)]
        return [kept_if(s, values[i]).astype(dtype) for s, i in zip(is_set, index)]


class _PrefixOneRowShort(_RunsOnly):
    """The row prefix leaves out the tile row just above: every row but the first reads too early (K = 64:
    one tile column)."""

    def decode_run(self, stored, row, col0, length, dtype, bind):
        bits, offsets, values = stored
        above = (row % TILE_ROWS - 1) + (row // TILE_ROWS) * TILE_ROWS
        lost = tirx.Select(row % TILE_ROWS > 0, _row_popcount(bits, above), tirx.const(0, "int32"))
        is_set, index = tile_run(bits, offsets, row, col0, length, bind)
        return [kept_if(s, values[i - lost]).astype(dtype) for s, i in zip(is_set, index)]


def _row_popcount(bits, row):
    """Set bits of W-row `row` in its tile (its two words) of the run's tile, as int32."""
    tm, r = row // TILE_ROWS, row % TILE_ROWS
    return sum(tirx.popcount(bits[tm, 0, 2 * r + w]).astype("int32") for w in range(2))


PLANTED = {
    "rank stops at a word's end": _RankStopsAtWordEnd("test-bitmap-run-rank"),
    "row prefix one row short": _PrefixOneRowShort("test-bitmap-run-prefix"),
}


def test_the_planted_bugs_driver_passes_without_a_bug():
    out, ref = replay_weight_gemm("bitmap", 128, 64, 9, SHIPPED_TILES[0], seed=2, stage=RUNS)
    assert relative_error(out, ref) < TOLERANCE


@pytest.mark.parametrize("bug", list(PLANTED))
def test_planted_run_rank_bug_fails_the_replay(bug):
    out, ref = replay_weight_gemm("bitmap", 128, 64, 9, SHIPPED_TILES[0], seed=2, stage=PLANTED[bug])
    assert relative_error(out, ref) > 0.05, bug
