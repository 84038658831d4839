"""The Tensor Core template, replayed on the CPU (emulated ldmatrix/mma, shuffled serial threads,
NaN-poisoned scratch memory), against numpy: every N from 1, padding, split-K, bias, formats."""

from __future__ import annotations

import numpy as np
import pytest
from tensorcore_cases import SMALL, relative_error, replay_weight_gemm

from tensorpress.compiler.formats import decode_stage
from tensorpress.errors import ConfigError, ShapeError
from tensorpress.schedules.tensorcore.template import schedule_weight_gemm
from tensorpress.schedules.tensorcore.tile_config import SHIPPED_TILES, TileConfig
from tensorpress.schedules.verification.tensorcore_emulation import emulated_intrinsics
from tensorpress.schedules.weight_gemm import make_weight_gemm

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
    func = make_weight_gemm(decode_stage("dense-fp16"), 80, 128)
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


# Shuffle seeds 0, 1, 6 run the K slices' CTAs (blockIdx.z) in the orders 2,1,0 / 2,0,1 / 0,1,2 at split_k=3
# (0,1 / 1,0 / 0,1 at split_k=2): every choice of the two partial sums added first is replayed.
@pytest.mark.parametrize("split_k, out_dtype", [(2, "float16"), (3, "float32")])
def test_split_k_reduction_is_bit_identical_in_every_thread_order(split_k, out_dtype):
    # Fails if slices are summed in CTA order (a planted one changed 765 of the 2688 outputs at split_k=3); hence fp32:
    # fp16 output rounds such 1-ulp fp32 differences away, and split_k=2 cannot tell (a + b == b + a exactly).
    config = TileConfig(block_n=16, block_m=64, block_k=32, warps=2, stages=2, split_k=split_k)
    outs = []
    for shuffle_seed in (0, 1, 6):  # same inputs (seed 11), three thread orders
        out, ref = replay_weight_gemm(
            "dense-fp16", 128, 384, 21, config, seed=11, bias=True, out_dtype=out_dtype, shuffle_seed=shuffle_seed
        )
        assert relative_error(out, ref) < (TOLERANCE if out_dtype == "float16" else 1e-4)
        outs.append(out.astype(out_dtype))
    bits = np.uint16 if out_dtype == "float16" else np.uint32  # raw bits: -0.0 and NaN payloads count
    for out in outs[1:]:
        np.testing.assert_array_equal(out.view(bits), outs[0].view(bits))


@pytest.mark.parametrize("m, k", [(72, 64), (64, 40)])
def test_m_and_k_must_be_multiples_of_16(m, k):
    func = make_weight_gemm(decode_stage("dense-fp16"), m, k)
    with pytest.raises(ShapeError, match="multiples of 16"):
        schedule_weight_gemm(func, SMALL, emulated_intrinsics())


def test_activations_must_be_float16():
    func = make_weight_gemm(decode_stage("dense-fp32"), 64, 64, act_dtype="float32")
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
