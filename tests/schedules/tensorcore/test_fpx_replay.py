"""FPx through the Tensor Core template, replayed on the CPU (emulated ldmatrix/mma, shuffled threads,
NaN-poisoned shared and register memory) against numpy: X · decode(encode(W))ᵀ for every format,
several N, M, K and the shipped tiles.

FPx stages decode the staged bit planes straight into the mma B fragments, two weights per register,
and scale Y's columns in the epilogue (`fragment_decode.py`); a PrimFunc made with the scale inside
the decode takes the older path through a decoded fp16 W tile. Planted bugs in either path must
build for CUDA and fail here."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from tensorcore_cases import relative_error, replay_weight_gemm
from tvm import s_tir, tirx

from tensorpress.compiler.formats import decode_stage, fpx_layout
from tensorpress.compiler.formats.fpx import FPxDecode
from tensorpress.schedules.tensorcore.intrinsics import PairAddressing, cuda_intrinsics
from tensorpress.schedules.tensorcore.template import TemplateBlocks, schedule_weight_gemm
from tensorpress.schedules.tensorcore.tile_config import SHIPPED_TILES, TileConfig
from tensorpress.schedules.verification.cuda_inspection import compile_cubin, cuda_source
from tensorpress.schedules.verification.tensorcore_emulation import emulated_intrinsics
from tensorpress.schedules.weight_gemm import make_weight_gemm

# Y is fp16: ~1 ulp at the largest |Y|. The reference multiplies by the exact decoded weights (fp32);
# the kernel sums exact products in fp32 and scales each column once, so only the sums round.
TOLERANCE = 2e-3
FORMATS = ["e3m2", "e2m3", "e2m2", "e3m1", "e2m1"]  # FP6 x2, FP5 x2, FP4: planes 4+2, 4+1, 4
TILE = TileConfig(block_n=16, block_m=32, block_k=64, warps=2, stages=2)
SHAPES = [  # (M, K, config): K not a multiple of 128 pads the planes; several K tiles; split-K
    (64, 256, TILE),
    (96, 192, TileConfig(block_n=32, block_m=32, block_k=64, warps=1, stages=3)),
    (64, 384, TileConfig(block_n=16, block_m=64, block_k=128, warps=2, stages=2, split_k=2)),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [1, 7, 16, 33, 64])
def test_every_format_every_token_count(fmt, n):
    m, k, config = SHAPES[n % len(SHAPES)]
    out, ref = replay_weight_gemm(fmt, m, k, n, config, seed=n, bias=n == 7)
    assert relative_error(out, ref) < TOLERANCE, (fmt, n, m, k, config.label())


@pytest.mark.parametrize("tile", SHIPPED_TILES, ids=lambda t: t.label())
def test_shipped_tiles(tile):
    i = SHIPPED_TILES.index(tile)
    fmt, n = FORMATS[i % len(FORMATS)], [1, 7, 16, 33, 64][i % 5]
    out, ref = replay_weight_gemm(fmt, 256, 256, n, tile, seed=i, bias=i % 2 == 0)
    assert relative_error(out, ref) < TOLERANCE, (fmt, n, tile.label())


def test_float32_output_and_a_wide_format():
    # fp32 Y: the kernel's only roundings are the fp32 sums, so it is close to numpy's fp32 product.
    out, ref = replay_weight_gemm("e4m3", 64, 256, 5, TILE, seed=3, out_dtype="float32")
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("fmt", ["e2m2", "e3m1"])
@pytest.mark.parametrize("in_registers", [True, False], ids=["fragment decode", "W tile"])
def test_one_word_rows_of_a_one_bit_plane(fmt, in_registers):
    # block_k = 32: a K tile of plane1 is one word a row; its cp.async copy has a single loop to split.
    config = TileConfig(block_n=16, block_m=32, block_k=32, warps=2, stages=3)
    out, ref = replay_weight_gemm(fmt, 64, 160, 9, config, seed=4, row_scale_in_epilogue=in_registers)
    assert relative_error(out, ref) < TOLERANCE


@pytest.mark.parametrize("fmt", ["e3m2", "e2m1"])
def test_scale_inside_the_decode_takes_the_w_tile_path(fmt):
    # A PrimFunc that scales every weight (row_scale_in_epilogue=False) decodes into a shared fp16 W
    # tile read by ldmatrix; its weights round to fp16 before the product, as the reference's do.
    func = make_weight_gemm(decode_stage(fmt), 64, 256, row_scale_in_epilogue=False)
    blocks = TemplateBlocks.of(schedule_weight_gemm(func, TILE, emulated_intrinsics()), emulated_intrinsics())
    assert blocks.w_shared is not None
    out, ref = replay_weight_gemm(fmt, 64, 256, 11, TILE, seed=6, row_scale_in_epilogue=False)
    assert relative_error(out, ref) < TOLERANCE


def test_fragment_decode_has_no_w_tile():
    func = make_weight_gemm(decode_stage("e3m2"), 64, 256)
    blocks = TemplateBlocks.of(schedule_weight_gemm(func, TILE, emulated_intrinsics()), emulated_intrinsics())
    assert blocks.w_shared is None and blocks.w_fragment is not None


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["e3m2", "e2m3", "e2m2", "e3m1", "e2m1", "e4m3", "e1m2", "e2m0", "e3m3"])
@pytest.mark.parametrize("n", [1, 17, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}_{s[2].label()}")
def test_every_format_every_shape(fmt, n, shape):
    m, k, config = shape
    out, ref = replay_weight_gemm(fmt, m, k, n, config, seed=n)
    assert relative_error(out, ref) < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tile", SHIPPED_TILES, ids=lambda t: t.label())
@pytest.mark.parametrize("n", [1, 16, 33])
@pytest.mark.parametrize("split_k", [1, 2])
def test_every_format_every_shipped_tile(fmt, tile, n, split_k):
    config = TileConfig(**{**tile.to_dict(), "split_k": split_k})
    out, ref = replay_weight_gemm(fmt, 256, 512, n, config, seed=n + split_k, bias=n % 2 == 1)
    assert relative_error(out, ref) < TOLERANCE


# --- planted bugs -------------------------------------------------------------------------------------


class _WrongWordDecode(FPxDecode):
    """Takes plane4's lane as col % 4 instead of col % 8 // 2 (forgets that a lane holds pairs): still
    a word of the same group, so the staged tile is the same rectangle."""

    def word_in_row(self, col, width):
        if width != 4:
            return super().word_in_row(col, width)
        return col // 32 * width + col % 4


class _WrongShiftDecode(FPxDecode):
    """Forgets the 16-bit half: the odd code of every pair decodes its even neighbour's field."""

    def bit_offset(self, col, width):
        return super().bit_offset(col - col % 2, width)


class _WrongScaleRowDecode(FPxDecode):
    """Multiplies every weight by the scale of the neighbouring row (row ^ 1)."""

    def decode(self, stored, row, col, dtype):
        *planes, scales = stored
        h = self.unscaled_decode(stored, row, col, "float16")
        return (h * tirx.const(self.exponent_fix, "float16") * scales[tirx.bitwise_xor(row, 1)]).astype(dtype)


class _SwappedHalvesDecode(FPxDecode):
    """Puts W[row, col + 1] in the low half of the pair and W[row, col] in the high half."""

    def fragment_pair(self, staged, row, col, bind=None):
        bits = super().fragment_pair(staged, row, col, bind)
        return (bits >> tirx.const(16, "uint32")) | (bits << tirx.const(16, "uint32"))


class _WrongColumnScaleDecode(FPxDecode):
    """Scales column m of Y by the row scale of weight row m ^ 1."""

    def row_scale(self, stored, row):
        return super().row_scale(stored, tirx.bitwise_xor(row, 1))


# Lanes numbered across instead of down: lane L takes the pairs of lane 4·(L % 8) + L // 8.
TRANSPOSED_LANES = PairAddressing(
    "transposed_lanes", lambda lane, pair: (lane % 8 + 8 * (pair // 2), 2 * (lane // 8) + 8 * (pair % 2))
)

# name: (decode stage, pair addressing, scale in the epilogue: the fragment-decode path)
PLANTED = {
    "W tile: wrong plane word": (_WrongWordDecode("test-fpx-wrong-word", 3, 2), None, False),
    "W tile: wrong bit shift": (_WrongShiftDecode("test-fpx-wrong-shift", 3, 2), None, False),
    "W tile: scale of the wrong row": (_WrongScaleRowDecode("test-fpx-wrong-scale-row", 3, 2), None, False),
    "registers: wrong plane word": (_WrongWordDecode("test-fpx-wrong-word-r", 3, 2), None, True),
    "registers: lanes take other lanes' pairs": (FPxDecode("test-fpx-lanes", 3, 2), TRANSPOSED_LANES, True),
    "registers: halves of the pair swapped": (_SwappedHalvesDecode("test-fpx-swapped-halves", 3, 2), None, True),
    "registers: scale of the wrong column": (_WrongColumnScaleDecode("test-fpx-wrong-column", 3, 2), None, True),
}


@pytest.fixture(scope="module")
def planted_cuda_compiles():
    """All planted bugs in one module, scheduled with the CUDA intrinsics and compiled by nvcc: it builds."""
    functions = {}
    for i, (stage, pairs, in_registers) in enumerate(PLANTED.values()):
        func = make_weight_gemm(stage, 128, 256, row_scale_in_epilogue=in_registers)
        intrinsics = cuda_intrinsics(pairs=pairs) if pairs else cuda_intrinsics()
        main = schedule_weight_gemm(func, TILE, intrinsics).mod["main"]
        functions[f"bug{i}"] = main.with_attr("global_symbol", f"bug{i}")
    cubin, _ = compile_cubin(cuda_source(tvm.IRModule(functions), "sm_80"), "sm_80")
    return len(cubin)


@pytest.mark.parametrize("bug", list(PLANTED))
def test_planted_decode_bug_compiles_for_cuda_and_fails_the_replay(bug, planted_cuda_compiles):
    assert planted_cuda_compiles > 0
    stage, pairs, in_registers = PLANTED[bug]
    intrinsics = emulated_intrinsics(pairs=pairs) if pairs else emulated_intrinsics()
    # the same driver, path and weights pass without the bug
    good, ref = replay_weight_gemm("e3m2", 128, 256, 9, TILE, seed=2, row_scale_in_epilogue=in_registers)
    assert relative_error(good, ref) < TOLERANCE
    out, ref = replay_weight_gemm(
        "e3m2", 128, 256, 9, TILE, seed=2, row_scale_in_epilogue=in_registers, stage=stage, intrinsics=intrinsics
    )
    assert relative_error(out, ref) > 0.05, bug


# --- the staged tiles -----------------------------------------------------------------------------------


def test_each_plane_is_staged_as_one_rectangle_per_k_tile():
    # The cp.async copy of each plane moves block_m rows x block_k * p / 32 words per K tile, each
    # word once, in whole 16-byte (plane2 at block_k = 32: 8-byte) vectors.
    m, k = 128, 512
    sch = schedule_weight_gemm(make_weight_gemm(FPxDecode("e3m2", 3, 2), m, k), TILE, emulated_intrinsics())
    for width in (4, 2):
        block = sch.get_sblock(f"plane{width}_shared")
        loops = sch.get_loops(block)
        k_loop = next(i for i, loop in enumerate(loops) if "k_0_0" in str(sch.get(loop).loop_var))
        extents = [int(sch.get(loop).extent) for loop in loops[k_loop + 1 :]]
        words, lanes = TILE.block_m * TILE.block_k * width // 32, min(4, TILE.block_k * width // 32)
        assert extents[-1] == lanes  # uint32 lanes of one cp.async
        # the cooperative copy spreads exactly the tile's words over the CTA's threads (the last
        # round predicated when they do not divide)
        assert words <= int(np.prod(extents)) < words + TILE.threads * lanes, (width, extents)
        assert sch.get(block).reads[0].region[1].extent == 1  # one word a lane, no gather
    assert fpx_layout.row_words(k, 4) == k * 4 // 32


def staged_row_pitches(sch: s_tir.Schedule) -> dict[str, int]:
    """Words between consecutive rows of each staged plane tile, once TVM has compacted the buffers."""
    lowering = [
        s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(),
    ]
    func = tvm.transform.Sequential(lowering)(sch.mod)["main"]
    pitches = {}

    def visit(block):
        for buffer in block.alloc_buffers:
            if str(buffer.name).startswith("plane"):
                pitches[str(buffer.name)] = int(buffer.strides[0]) if buffer.strides else int(buffer.shape[-1])
        return block

    tvm_ffi.structural_map(func.body, (s_tir.stmt.SBlock, visit))
    return pitches


@pytest.mark.parametrize("block_k", [32, 64, 128])
@pytest.mark.parametrize("fmt", ["e3m2", "e2m2"])
def test_a_warp_reads_the_staged_words_without_bank_conflicts(fmt, block_k):
    # One decode instruction of a warp: lane 4g + t reads, for its pair j, the word of row g holding
    # column 2t + 8j (fpx_layout); rows are `pitch` words apart. 32 banks of 4 bytes: lanes must hit
    # distinct banks or the very same word (a broadcast).
    config = TileConfig(block_n=16, block_m=32, block_k=block_k, warps=2, stages=2)
    sch = schedule_weight_gemm(make_weight_gemm(decode_stage(fmt), 64, 256), config, emulated_intrinsics())
    pitches = staged_row_pitches(sch)
    stage = decode_stage(fmt)
    assert sorted(pitches) == sorted(f"{fpx_layout.plane_name(p)}_shared" for p in stage.widths)
    for width in stage.widths:
        pitch = pitches[f"{fpx_layout.plane_name(width)}_shared"]
        for group in range(block_k // 32):
            for j in range(4):
                cols = [(g, 32 * group + 2 * t + 8 * j) for g in range(8) for t in range(4)]
                words = {g * pitch + fpx_layout.word_in_row(col, width) for g, col in cols}
                banks = {w % 32 for w in words}
                assert len(banks) == len(words), (fmt, width, pitch, group, j)
