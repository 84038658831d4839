"""FPx through the Tensor Core template, replayed on the CPU (emulated ldmatrix/mma, shuffled threads,
NaN-poisoned shared memory) against numpy: X · decode(encode(W))ᵀ for every format, several N, M, K.

The planes are staged (cp.async into shared memory, then decoded from there), so these also check
that the staged tiles are the right rectangles. Planted bugs in the decode must build for CUDA and
fail here."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tensorcore_cases import relative_error, replay_weight_gemm
from tvm import tirx

from tensorpress.compiler.formats import fpx_layout
from tensorpress.compiler.formats.registry import get_weight_format
from tensorpress.schedules.fpx_gemm import FPxDecode
from tensorpress.schedules.tensorcore.config import TileConfig
from tensorpress.schedules.tensorcore.emulation import emulated_intrinsics
from tensorpress.schedules.tensorcore.inspection import compile_cubin, cuda_source
from tensorpress.schedules.tensorcore.intrinsics import cuda_intrinsics
from tensorpress.schedules.tensorcore.replay import build_replay
from tensorpress.schedules.tensorcore.template import schedule_weight_gemm
from tensorpress.schedules.weight_gemm import make_weight_gemm, register_decode_stage

TOLERANCE = 2e-3  # fp16 output: ~1 ulp at the largest |Y| (fp32 accumulation in both)
FORMATS = ["e3m2", "e2m3", "e2m2", "e3m1", "e2m1"]  # FP6 x2, FP5 x2, FP4: planes 4+2, 4+1, 4
# block_k >= 64: a 32-wide K tile of a 1-bit plane is a single word, which the template's staging
# cannot split over threads yet (see the report of the FPx layout).
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


def test_float32_output_and_a_wide_format():
    out, ref = replay_weight_gemm("e4m3", 64, 256, 5, TILE, seed=3, out_dtype="float32")
    assert relative_error(out, ref) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["e3m2", "e2m3", "e2m2", "e3m1", "e2m1", "e4m3", "e1m2", "e2m0", "e3m3"])
@pytest.mark.parametrize("n", [1, 17, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}_{s[2].label()}")
def test_every_format_every_shape(fmt, n, shape):
    m, k, config = shape
    out, ref = replay_weight_gemm(fmt, m, k, n, config, seed=n)
    assert relative_error(out, ref) < TOLERANCE


# --- planted bugs in the decode -----------------------------------------------------------------------


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
    """Multiplies by the scale of the neighbouring row (row ^ 1)."""

    def decode(self, stored, row, col, dtype):
        *planes, scales = stored
        h = tirx.reinterpret("float16", self.fp16_bits(planes, row, col).astype("uint16"))
        value = h * tirx.const(2.0 ** (15 - 3), "float16")  # e3m2: bias 3
        return (value * scales[tirx.bitwise_xor(row, 1)]).astype(dtype)


PLANTED = {
    "wrong plane word": _WrongWordDecode("test-fpx-wrong-word", 3, 2),
    "wrong bit shift": _WrongShiftDecode("test-fpx-wrong-shift", 3, 2),
    "scale of the wrong row": _WrongScaleRowDecode("test-fpx-wrong-scale-row", 3, 2),
}
for _stage in PLANTED.values():
    register_decode_stage(_stage)


@pytest.fixture(scope="module")
def planted_cuda_compiles():
    """All planted bugs in one module, scheduled with the CUDA intrinsics and compiled by nvcc: it builds."""
    functions = {}
    for i, stage in enumerate(PLANTED.values()):
        func = make_weight_gemm(stage, 128, 256)
        main = schedule_weight_gemm(func, TILE, cuda_intrinsics()).mod["main"]
        functions[f"bug{i}"] = main.with_attr("global_symbol", f"bug{i}")
    cubin, _ = compile_cubin(cuda_source(tvm.IRModule(functions), "sm_80"), "sm_80")
    return len(cubin)


def replay_stage(stage: FPxDecode, m: int, k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Replay `stage`'s GEMM on weights packed by the real e3m2 format; (kernel Y, numpy Y)."""
    sch = schedule_weight_gemm(make_weight_gemm(stage, m, k), TILE, emulated_intrinsics())
    kernel = build_replay(sch.mod, seed)["main"]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k)).astype(np.float16)
    fmt = get_weight_format("e3m2")
    packed = fmt.pack((rng.standard_normal((m, k)) * rng.uniform(0.01, 1, (m, 1))).astype(np.float32))
    reference = x.astype(np.float32) @ fmt.unpack(packed).astype(np.float16).astype(np.float32).T
    y = np.full((n, m), np.nan, np.float16)
    args = [x, *(packed.arrays[b.name] for b in stage.stored_buffers(m, k)), y]
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args]
    kernel(*tensors)
    return tensors[-1].numpy().astype(np.float32), reference


@pytest.mark.parametrize("bug", list(PLANTED))
def test_planted_decode_bug_compiles_for_cuda_and_fails_the_replay(bug, planted_cuda_compiles):
    assert planted_cuda_compiles > 0
    good, ref = replay_stage(FPxDecode("e3m2", 3, 2), 128, 256, 9, seed=2)
    assert relative_error(good, ref) < TOLERANCE  # the same driver passes without the bug
    out, ref = replay_stage(PLANTED[bug], 128, 256, 9, seed=2)
    assert relative_error(out, ref) > 0.05, bug


def test_each_plane_is_staged_as_one_rectangle_per_k_tile():
    # The cp.async copy of each plane moves block_m rows x block_k * p / 32 words per K tile, each
    # word once, in whole 16-byte (plane2 at block_k = 32: 8-byte) vectors.
    m, k = 128, 512
    sch = schedule_weight_gemm(make_weight_gemm(FPxDecode("e3m2", 3, 2), m, k), TILE, emulated_intrinsics())
    for width in (4, 2):
        block = sch.get_sblock(f"plane{width}_shared.dyn")
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
