"""The bit scatter (`schedules/tile_scatter.py`, `decode_stage.py` "Tile scatter", bitmap words): the
Tensor Core template zero-fills each W tile, then loops over the set bits of the bitmap's words, storing
each nonzero at its position (bitmap: its fp16 value; bitmap x FPx: its code's unscaled value, the row
scale in the epilogue). Replayed on the CPU (shuffled threads, NaN-poisoned scratch memory) against
numpy at densities 0, 20%, 50%, 80% and 100%, odd N, M of one 16-row tile, K padded inside the kernel, W
tiles of several format tiles, half of one (block_k 32) and split-K. The loop over a word's set bits
takes a chunk of them a trip (`SetBits.chunk`), so the densities also give trips with a chunk's last
bits missing. Planted bugs must fail: a wrong position bit, a group popcount one too many, a rank one
off, a missed word, a missed zero-fill, a lane skipping the end of its share (its trips rounded down to
whole chunks), a code read one code off in the stream (bitmap x FPx)."""

from __future__ import annotations

import numpy as np
import pytest
from tensorcore_cases import relative_error, replay_weight_gemm
from tvm import tirx

import tensorpress.schedules.tile_scatter as tile_scatter
from tensorpress.compiler.formats import decode_stage
from tensorpress.compiler.formats.bitmap import BitmapDecode
from tensorpress.compiler.formats.bitmap_fpx import BitmapFPxDecode
from tensorpress.compiler.formats.fpx import fpx_decode_stage
from tensorpress.schedules.decode_stage import SetBits, TileScatter
from tensorpress.schedules.tensorcore.intrinsics import cuda_intrinsics
from tensorpress.schedules.tensorcore.template import schedule_weight_gemm
from tensorpress.schedules.tensorcore.tile_config import SHIPPED_TILES, TileConfig
from tensorpress.schedules.weight_gemm import make_weight_gemm

TOLERANCE = 2e-3  # fp16 output of fp32 sums
SMALL = TileConfig(block_n=16, block_m=64, block_k=128, warps=2, stages=2)  # 4 x 2 format tiles a W tile
HALF = TileConfig(block_n=16, block_m=32, block_k=32, warps=2, stages=2)  # half a format tile along K
ONE_ROW = TileConfig(block_n=16, block_m=16, block_k=64, warps=1, stages=2)  # one format tile, one warp
SPLIT_K = TileConfig(block_n=16, block_m=32, block_k=64, warps=2, stages=2, split_k=2)
FORMATS = ["bitmap", "bitmap-e3m2"]


@pytest.fixture(autouse=True)
def scatter_at_every_density(monkeypatch):
    """This module tests the scatter: bitmap's template takes it at every density here (the shipped
    stage decodes into B fragments above 33 % density, `test_bitmap_fragment_decode.py`)."""
    monkeypatch.setattr(BitmapDecode, "fragment_decode_preferred", lambda self, stored, m, k: False)


def _check(out: np.ndarray, ref: np.ndarray) -> None:
    if not np.abs(ref).max():  # an all-zero weight: the zero-filled tiles, exactly
        assert not np.isnan(out).any() and not out.any()
    else:
        assert relative_error(out, ref) < TOLERANCE


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "sparsity, n",
    [(1.0, 1), (0.5, 5), (0.8, 17), (0.2, 9), (0.0, 3)],
    ids=["density0", "density50%", "density20%", "density80%", "dense"],
)
def test_replay_matches_numpy(fmt, sparsity, n):
    out, ref = replay_weight_gemm(fmt, 64, 256, n, SMALL, seed=n, sparsity=sparsity, bias=True)
    _check(out, ref)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("config", [HALF, ONE_ROW, SPLIT_K, SHIPPED_TILES[0]], ids=lambda c: c.label())
def test_replay_odd_shapes_padded_k_and_split_k(fmt, config):
    # K = 208: the last format tile is part padding, and K tiles of 64 / 128 reach past K
    m = max(config.block_m, 16)
    out, ref = replay_weight_gemm(fmt, m, 208, 7, config, seed=2, sparsity=0.5, shuffle_seed=config.block_m + 1)
    _check(out, ref)


@pytest.mark.parametrize("redirect", [False, True], ids=["skipped", "redirected"])
@pytest.mark.parametrize("fmt, chunk", [("bitmap", 1), ("bitmap", 3), ("bitmap-e3m2", 2), ("bitmap-e3m2", 5)])
def test_replay_every_chunk_and_missing_bit_store(monkeypatch, fmt, chunk, redirect):
    """The shipped chunks are checked above; other chunks (odd, a window's last whole code) and both
    ways of storing a chunk's missing bits give W too, at 80% and 50% sparsity."""
    import dataclasses

    import tensorpress.compiler.formats.bitmap as bitmap
    import tensorpress.compiler.formats.bitmap_fpx as bitmap_fpx

    monkeypatch.setattr(bitmap, "SCATTER_CHUNK", chunk)
    monkeypatch.setattr(bitmap_fpx, "SCATTER_CHUNK", chunk)
    stage = decode_stage(fmt)
    assert stage.tile_scatter is not None and stage.tile_scatter.set_bits is not None
    assert stage.tile_scatter.set_bits.chunk == chunk
    bits = dataclasses.replace(stage.tile_scatter.set_bits, redirect_missing=redirect)
    stage.tile_scatter = dataclasses.replace(stage.tile_scatter, set_bits=bits)
    for sparsity, seed in ((0.8, 11), (0.5, 12)):
        out, ref = replay_weight_gemm(fmt, 64, 256, 5, SMALL, seed=seed, sparsity=sparsity, stage=stage)
        _check(out, ref)


def test_the_template_takes_the_scatter_and_keeps_the_gather_as_the_definition():
    """bitmap declares the scatter and a per-element decode: the PrimFunc keeps the decode (W[m, k], the
    CPU's path); the Tensor Core template builds its W tiles by the scatter (no run blocks)."""
    from tensorpress.compiler.formats import get_weight_format
    from tensorpress.compiler.pruning import prune

    w = prune(np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32), 0.8)
    func = make_weight_gemm(decode_stage("bitmap"), 64, 128, buffers=get_weight_format("bitmap").pack(w).buffers)
    assert "popcount" in func.script()  # the gather's rank: W[m, k] is still defined element by element
    scheduled = schedule_weight_gemm(func, SMALL, cuda_intrinsics()).mod.script()
    assert "set_bit" in scheduled and "run_rank0" not in scheduled


class _RankOneOff(BitmapDecode):
    """The tile's first index one too many: every nonzero takes its successor's value."""

    def __init__(self):
        super().__init__("test-bitmap-scatter-rank")
        scatter = self.tile_scatter
        assert scatter is not None and scatter.set_bits is not None
        bits = scatter.set_bits
        first = lambda stored, r, c: bits.first_index(stored, r, c) + 1  # noqa: E731
        self.tile_scatter = TileScatter(**{**scatter.__dict__, "set_bits": SetBits(first, bits.value)})


class _CodeWindowOffByOne(BitmapFPxDecode):
    """bitmap x FPx: each code read from the stream words one after the right ones."""

    def __init__(self):
        super().__init__("test-bitmap-fpx-scatter-window", fpx_decode_stage(3, 2))

    def window(self, codes, rank):
        return super().window(codes, rank + tirx.const(32 // self.values.bits, "int32"))


class _CodeOneOff(BitmapFPxDecode):
    """bitmap x FPx: each chunk's window starts one code late (a running code offset one code off)."""

    def __init__(self):
        super().__init__("test-bitmap-fpx-scatter-code", fpx_decode_stage(3, 2))

    def window(self, codes, rank):
        return super().window(codes, rank + 1)


def _wrong_position_bit(monkeypatch):
    lowest = tile_scatter.lowest_set_bit
    monkeypatch.setattr(tile_scatter, "lowest_set_bit", lambda mask: lowest(mask) ^ 1)


def _popcount_one_too_many(monkeypatch):
    counted = tile_scatter.group_popcount
    monkeypatch.setattr(tile_scatter, "group_popcount", lambda words: counted(words) + 1)


def _missed_word(monkeypatch):
    word = tile_scatter._BitScatter._word
    skip_last = lambda self, g, e: tirx.Evaluate(0) if e == self.scatter.vector - 1 else word(self, g, e)  # noqa: E731
    monkeypatch.setattr(tile_scatter._BitScatter, "_word", skip_last)


def _missed_zero_fill(monkeypatch):
    monkeypatch.setattr(tile_scatter, "_zero_fill", lambda *args: tirx.Evaluate(0))


def _share_rounded_down(monkeypatch):
    # a lane stops at its last whole chunk: the set bits of its word past it are never stored
    monkeypatch.setattr(tile_scatter, "chunk_trips", lambda bits, chunk: bits // chunk)


SEAM_BUGS = {
    "wrong position bit": _wrong_position_bit,
    "group popcount one too many": _popcount_one_too_many,
    "missed word": _missed_word,
    "missed zero-fill": _missed_zero_fill,
    "share rounded down to whole chunks": _share_rounded_down,
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_planted_bugs_driver_passes_without_a_bug(fmt):
    out, ref = replay_weight_gemm(fmt, 64, 256, 5, SMALL, seed=5, sparsity=0.5)
    assert relative_error(out, ref) < TOLERANCE


@pytest.mark.parametrize("bug", list(SEAM_BUGS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_planted_scatter_bugs_fail(monkeypatch, fmt, bug):
    SEAM_BUGS[bug](monkeypatch)
    out, ref = replay_weight_gemm(fmt, 64, 256, 5, SMALL, seed=5, sparsity=0.5)
    assert relative_error(out, ref) > 0.05, bug


@pytest.mark.parametrize(
    "fmt, stage",
    [("bitmap", _RankOneOff), ("bitmap-e3m2", _CodeWindowOffByOne), ("bitmap-e3m2", _CodeOneOff)],
    ids=["rank one off", "code window", "code one off"],
)
def test_planted_value_bugs_fail(fmt, stage):
    out, ref = replay_weight_gemm(fmt, 64, 256, 5, SMALL, seed=5, sparsity=0.5, stage=stage())
    assert relative_error(out, ref) > 0.05


class _ScatterDefinedBitmap(BitmapDecode):
    """bitmap whose W is defined by its scatter (no per-element decode): `make_weight_gemm`'s one thread
    walks every tile in order, a running rank over its groups."""

    decodes_elements = False

    def __init__(self):
        super().__init__("test-bitmap-scatter-defined")


@pytest.mark.parametrize("sparsity", [1.0, 0.5, 0.0])
def test_one_thread_scatter_built_for_llvm_is_unpack(sparsity):
    """Y = I . W^T through the CPU GEMM is W itself: the one-thread scatter (running rank) equals unpack."""
    import tvm
    from tvm.s_tir import dlight as dl

    from tensorpress.compiler.formats import get_weight_format
    from tensorpress.compiler.pruning import prune
    from tensorpress.schedules.cpu import cpu_rules

    m, k = 48, 200  # K not a multiple of the 16 x 64 tiles
    w = np.random.default_rng(3).standard_normal((m, k)).astype(np.float32)
    w = np.zeros_like(w) if sparsity >= 1 else prune(w, sparsity) if sparsity else w
    fmt = get_weight_format("bitmap")
    packed = fmt.pack(w)
    func = make_weight_gemm(_ScatterDefinedBitmap(), m, k, "float32", buffers=packed.buffers)
    assert "set_bit" in func.script()
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    with target:
        mod = dl.ApplyDefaultSchedule(*cpu_rules())(tvm.IRModule({"main": func}))
    kernel = tvm.compile(mod, target=target)["main"]
    dev = tvm.cpu()
    arrays = [np.eye(k, dtype=np.float32), *packed.arrays.values()]
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]
    y = tvm.runtime.empty((k, m), "float32", dev)
    kernel(*args, y)
    np.testing.assert_array_equal(y.numpy().T, fmt.unpack(packed))
