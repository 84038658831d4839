"""The Tensor Core template, replayed on the CPU (emulated ldmatrix/mma, shuffled serial threads,
NaN-poisoned scratch memory), against numpy: every N from 1, padding, split-K, bias, formats."""

from __future__ import annotations

import numpy as np
import pytest
from tensorcore_cases import SMALL, relative_error, replay_weight_gemm

from tensorpress.errors import ConfigError, ShapeError
from tensorpress.schedules.tensorcore.config import SHIPPED_TILES, TileConfig
from tensorpress.schedules.tensorcore.emulation import emulated_intrinsics
from tensorpress.schedules.tensorcore.template import schedule_weight_gemm
from tensorpress.schedules.weight_gemm import get_decode_stage, make_weight_gemm

TOLERANCE = 2e-3  # fp16 output: ~1 ulp at the largest |Y| (fp32 accumulation in both)


@pytest.mark.parametrize("n, seed", [(1, 0), (16, 1), (17, 2), (40, 3)])
def test_dense_every_token_count(n, seed):
    out, ref = replay_weight_gemm("dense-fp16", 256, 256, n, SMALL, seed=seed)
    assert relative_error(out, ref) < TOLERANCE


@pytest.mark.parametrize(
    "config, n",
    [
        (TileConfig(block_n=16, block_m=64, block_k=32, warps=2, stages=3, split_k=2), 5),
        (TileConfig(block_n=32, block_m=64, block_k=64, warps=2, stages=2, split_k=1), 33),
        (TileConfig(block_n=64, block_m=32, block_k=32, warps=1, stages=4, split_k=3), 64),
    ],
    ids=lambda v: v.label() if isinstance(v, TileConfig) else str(v),
)
def test_dense_tile_shapes_split_k_and_bias(config, n):
    out, ref = replay_weight_gemm("dense-fp16", 128, 384, n, config, seed=n, bias=True)
    assert relative_error(out, ref) < TOLERANCE


@pytest.mark.parametrize("tile", [SHIPPED_TILES[0], SHIPPED_TILES[4], SHIPPED_TILES[-1]], ids=lambda t: t.label())
def test_shipped_tiles(tile):
    out, ref = replay_weight_gemm("dense-fp16", 256, 256, 70, tile, seed=7)
    assert relative_error(out, ref) < TOLERANCE


@pytest.mark.parametrize("split_k", [1, 2])
def test_k_that_tiles_do_not_divide_is_padded_inside(split_k):
    config = TileConfig(block_n=16, block_m=16, block_k=64, warps=1, stages=2, split_k=split_k)
    out, ref = replay_weight_gemm("dense-fp16", 80, 112, 19, config, seed=split_k, bias=True)
    assert relative_error(out, ref) < TOLERANCE


def test_block_m_must_divide_m():
    func = make_weight_gemm(get_decode_stage("dense-fp16"), 80, 128)
    with pytest.raises(ShapeError, match="multiple of block_m=64"):
        schedule_weight_gemm(func, SMALL, emulated_intrinsics())


def test_float32_output():
    out, ref = replay_weight_gemm("dense-fp16", 128, 128, 9, SMALL, seed=4, out_dtype="float32")
    assert relative_error(out, ref) < 1e-4


@pytest.mark.parametrize("fmt", ["dense-fp32", "test-int4-staged", "test-int4-global", "fp6"])
def test_decode_stages_plug_in_unchanged(fmt):
    # dense-fp32 casts while fetching; test-int4-staged stages packed words in shared memory with
    # cp.async and decodes from there; test-int4-global and FPx decode straight from global memory.
    out, ref = replay_weight_gemm(fmt, 128, 256, 7, SMALL, seed=5)
    assert relative_error(out, ref) < TOLERANCE


def test_result_does_not_depend_on_thread_order():
    first, _ = replay_weight_gemm("dense-fp16", 128, 256, 21, SMALL, seed=11)
    config = TileConfig(block_n=16, block_m=64, block_k=32, warps=2, stages=2, split_k=1)
    # same inputs (seed 11 draws them), another order: bit-identical
    second, _ = replay_weight_gemm("dense-fp16", 128, 256, 21, config, seed=11)
    assert np.array_equal(first, second)


@pytest.mark.parametrize("m, k", [(72, 64), (64, 40)])
def test_m_and_k_must_be_multiples_of_16(m, k):
    func = make_weight_gemm(get_decode_stage("dense-fp16"), m, k)
    with pytest.raises(ShapeError, match="multiples of 16"):
        schedule_weight_gemm(func, SMALL, emulated_intrinsics())


def test_activations_must_be_float16():
    func = make_weight_gemm(get_decode_stage("dense-fp32"), 64, 64, act_dtype="float32")
    with pytest.raises(ConfigError, match="float16 activations"):
        schedule_weight_gemm(func, SMALL, emulated_intrinsics())


@pytest.mark.slow
@pytest.mark.parametrize("tile", SHIPPED_TILES, ids=lambda t: t.label())
@pytest.mark.parametrize("n", [1, 3, 16, 31, 64, 65, 130])
@pytest.mark.parametrize("split_k", [1, 2])
def test_every_shipped_tile_every_n(tile, n, split_k):
    config = TileConfig(**{**tile.to_dict(), "split_k": split_k})
    out, ref = replay_weight_gemm("dense-fp16", 256, 512, n, config, seed=n + split_k, bias=n % 2 == 1)
    assert relative_error(out, ref) < TOLERANCE
