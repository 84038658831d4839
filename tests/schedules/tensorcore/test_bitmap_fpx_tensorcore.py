"""bitmap x FPx sparse weights (`compiler/formats/bitmap_fpx.py`) on the Tensor Core template: the tile
scatter over the bitmap's set bits (each nonzero's code read from the stream at its rank, its unscaled
value stored at its position in the zero-filled W tile; `test_bit_scatter.py` plants its bugs), which the
template prefers; without it (a test stage) runs along K (a thread decodes a tile row: a rank per chunk
of 4, the chunk's codes read as one window) or, on tiles too small for whole warps of runs, the plain
decode (the full rank a weight). The FPx row scale multiplies Y in the epilogue. Replayed on the CPU
(emulated ldmatrix / mma, shuffled threads, NaN-poisoned shared and register memory) against numpy for
decode and prefill tiles and split-K, weights pruned 80% by magnitude; planted decode bugs (plain: an
off-by-one popcount, a wrong position bit; runs: a chunk rank one short, a window word off by one) build
for CUDA and fail the replay; built by nvcc for sm_80 and sm_90a (every shipped tile and split-K): HMMA,
LDSM and LDGSTS in the SASS, nothing spilled. The nvcc builds, the split-K and prefill replays and the
planted bugs' CUDA build are marked slow (`-m slow`); by default the decode tile is replayed and the
planted bugs fail."""

from __future__ import annotations

import pytest
import tvm
from tensorcore_cases import check_tensor_core_kernels, once_per_session, relative_error, replay_weight_gemm
from tvm import tirx

from tensorpress.compiler.formats import code_stream, decode_stage, get_weight_format
from tensorpress.compiler.formats.bitmap import tile_rank
from tensorpress.compiler.formats.bitmap_fpx import BitmapFPxDecode
from tensorpress.compiler.formats.fpx import fpx_decode_stage
from tensorpress.compiler.pruning import prune
from tensorpress.schedules.tensorcore.intrinsics import cuda_intrinsics
from tensorpress.schedules.tensorcore.run_tile import run_length
from tensorpress.schedules.tensorcore.template import TemplateBlocks, schedule_weight_gemm
from tensorpress.schedules.tensorcore.tile_config import SHIPPED_TILES, TileConfig
from tensorpress.schedules.verification.cuda_inspection import (
    CudaBuild,
    build_for_inspection,
    compile_cubin,
    cuda_source,
    kernel_reports,
)
from tensorpress.schedules.verification.tensorcore_emulation import emulated_intrinsics
from tensorpress.schedules.weight_gemm import make_weight_gemm

FORMAT = "bitmap-e3m2"
DECODE_TILE = SHIPPED_TILES[0]  # n16 m128 k64: decode steps (N <= 16), the benchmark's target
SPLIT_K = TileConfig(**{**DECODE_TILE.to_dict(), "split_k": 2})
SLOW = pytest.mark.slow  # the prefill tile, FP5 values, the nvcc builds beyond the decode tile
CONFIGS = [DECODE_TILE, pytest.param(SPLIT_K, marks=SLOW), pytest.param(SHIPPED_TILES[4], marks=SLOW)]
TOLERANCE = 2e-3  # fp16 output of fp32 sums of exact products
SMALL = TileConfig(block_n=16, block_m=32, block_k=64, warps=2, stages=2)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label())
def test_replay_matches_numpy(config):
    out, ref = replay_weight_gemm(FORMAT, 128, 256, 19, config, seed=3, bias=True)
    assert relative_error(out, ref) < TOLERANCE


def test_runs_crossing_k_match_numpy():
    out, ref = replay_weight_gemm(FORMAT, 64, 208, 9, SMALL, seed=5, bias=True, stage=WITHOUT_SCATTER)  # K = 208
    assert relative_error(out, ref) < TOLERANCE


@pytest.mark.parametrize("fmt, n", [("bitmap-e2m1", 1), pytest.param("bitmap-e2m3", 33, marks=SLOW)])
def test_other_fpx_values_and_token_counts(fmt, n):
    out, ref = replay_weight_gemm(fmt, 64, 192, n, SMALL, seed=n, shuffle_seed=n + 1)
    assert relative_error(out, ref) < TOLERANCE


def test_takes_the_scatter_path_with_the_scale_in_the_epilogue():
    func = make_weight_gemm(decode_stage(FORMAT), 64, 256, buffers=_buffers(64, 256))
    assert bool(func.attrs["tensorpress.row_scale_in_epilogue"])
    scheduled = schedule_weight_gemm(func, SMALL, emulated_intrinsics()).mod.script()
    assert "set_bit" in scheduled and "run_rank0" not in scheduled  # the bit scatter, not runs along K
    unscaled = make_weight_gemm(decode_stage(FORMAT), 64, 256, buffers=_buffers(64, 256), row_scale_in_epilogue=False)
    blocks = TemplateBlocks.of(schedule_weight_gemm(unscaled, SMALL, emulated_intrinsics()), emulated_intrinsics())
    assert blocks.w_shared is not None  # scaled weights: the per-element decode fills the shared W tile


class _WithoutScatter(BitmapFPxDecode):
    """bitmap x FPx without its tile scatter (which the template prefers): the plain and run decodes."""

    def __init__(self, name: str, values):
        super().__init__(name, values)
        self.tile_scatter = None


class _OffByOnePopcount(_WithoutScatter):
    """Counts the weight's own bit in its rank: every stored weight reads its successor's code."""

    def unscaled_decode(self, stored, row, col, dtype):
        bits, offsets, codes = stored[:-1]
        is_set, index = tile_rank(bits, offsets, row, col)
        h = tirx.reinterpret("float16", self.values.code_fp16_bits(self.window(codes, index + 1)).astype("uint16"))
        return tirx.Select(is_set, h, tirx.const(0, "float16")).astype(dtype)


class _WrongPositionBit(_WithoutScatter):
    """Tests bit (p ^ 1) for whether W[row, col] is stored: neighbouring columns swap their masks."""

    def unscaled_decode(self, stored, row, col, dtype):
        return super().unscaled_decode(stored, row, tirx.bitwise_xor(col, 1), dtype)


class _ChunkRankOneShort(_WithoutScatter):
    """A run's chunk rank leaves out the previous chunk's last bit: the chunk after a set last bit reads
    its codes from one code too early."""

    def chunk_rank(self, rank, mask):
        last = (mask >> tirx.const(self.chunk - 1, "uint32")) & tirx.const(1, "uint32")
        return super().chunk_rank(rank, mask) - last.astype("int32")


class _WindowWordOffByOne(_WithoutScatter):
    """A run's window reads the stream words one after the right ones (in bounds: the spare word)."""

    def window(self, codes, rank):
        class _NextWord:
            def __getitem__(self, index):
                row, word = index
                return codes[row, word + 1]

        return code_stream.window(_NextWord(), self.values.bits, rank)


PLANTED = {  # the plain decode (one weight a thread): on PLAIN, whose W tile has too few runs for a warp
    "off-by-one popcount": _OffByOnePopcount("test-bitmap-fpx-popcount", fpx_decode_stage(3, 2)),
    "wrong position bit": _WrongPositionBit("test-bitmap-fpx-bit", fpx_decode_stage(3, 2)),
}
PLANTED_RUNS = {  # the runs along K: on SMALL
    "chunk rank one short": _ChunkRankOneShort("test-bitmap-fpx-chunk-rank", fpx_decode_stage(3, 2)),
    "window word off by one": _WindowWordOffByOne("test-bitmap-fpx-window", fpx_decode_stage(3, 2)),
}
PLAIN = TileConfig(block_n=16, block_m=16, block_k=32, warps=1, stages=2)  # 16 runs of 32: no runs


def _buffers(m: int, k: int):
    import numpy as np

    w = prune(np.random.default_rng(0).standard_normal((m, k)).astype(np.float32), 0.8)
    return get_weight_format(FORMAT).pack(w).buffers


@pytest.mark.slow
def test_planted_bugs_compile_for_cuda():
    functions = {}
    for i, (stage, config) in enumerate(_planted_cases().values()):
        func = make_weight_gemm(stage, 128, 256, buffers=_buffers(128, 256))
        main = schedule_weight_gemm(func, config, cuda_intrinsics()).mod["main"]
        functions[f"bug{i}"] = main.with_attr("global_symbol", f"bug{i}")
    cubin, _ = compile_cubin(cuda_source(tvm.IRModule(functions), "sm_80"), "sm_80")
    assert len(cubin) > 0


def _planted_cases() -> dict:
    return {**{b: (s, PLAIN) for b, s in PLANTED.items()}, **{b: (s, SMALL) for b, s in PLANTED_RUNS.items()}}


def test_the_plain_and_run_paths():
    stage = decode_stage(FORMAT)
    assert (run_length(stage, PLAIN), run_length(stage, SMALL), run_length(stage, DECODE_TILE)) == (None, 64, 64)


WITHOUT_SCATTER = _WithoutScatter("test-bitmap-fpx-no-scatter", fpx_decode_stage(3, 2))


@pytest.mark.parametrize("config", [PLAIN, SMALL], ids=lambda c: c.label())
def test_the_planted_bugs_driver_passes_without_a_bug(config):
    out, ref = replay_weight_gemm(FORMAT, 128, 256, 9, config, seed=2, stage=WITHOUT_SCATTER)
    assert relative_error(out, ref) < TOLERANCE


@pytest.mark.parametrize("bug", [*PLANTED, *PLANTED_RUNS])
def test_planted_decode_bug_fails_the_replay(bug):
    stage, config = _planted_cases()[bug]
    out, ref = replay_weight_gemm(FORMAT, 128, 256, 9, config, seed=2, stage=stage)
    assert relative_error(out, ref) > 0.05, bug


def _sass_reports(configs: list[TileConfig]) -> dict:
    buffers = _buffers(4096, 4096)
    functions = {}
    for config in configs:
        func = make_weight_gemm(decode_stage(FORMAT), 4096, 4096, with_bias=True, buffers=buffers)
        main = schedule_weight_gemm(func, config, cuda_intrinsics()).mod["main"]
        functions[config.label()] = main.with_attr("global_symbol", config.label())
    module = tvm.IRModule(functions)
    return {arch: build_for_inspection(module, arch).to_json() for arch in ("sm_80", "sm_90a")}


@pytest.fixture(scope="module")
def decode_tile_reports(tmp_path_factory) -> dict:
    return once_per_session(tmp_path_factory, "bitmap_fpx_sass", lambda: _sass_reports([DECODE_TILE]))


@pytest.fixture(scope="module")
def other_tile_reports(tmp_path_factory) -> dict:
    return once_per_session(tmp_path_factory, "bitmap_fpx_sass_more", lambda: _sass_reports(OTHER_SASS))


def _check_sass(reports: dict, arch: str, config: TileConfig) -> None:
    kernels = sorted(
        (r for r in kernel_reports(CudaBuild.from_json(reports[arch])) if r.name.split("_kernel")[0] == config.label()),
        key=lambda r: r.name,
    )
    check_tensor_core_kernels(kernels, config, arch)


@pytest.mark.slow  # 143 s of ptxas and TVM codegen at load 5
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_sass_of_the_decode_tile_has_the_tensor_core_path(decode_tile_reports, arch):
    _check_sass(decode_tile_reports, arch, DECODE_TILE)


OTHER_SASS = [SPLIT_K, *SHIPPED_TILES[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("config", OTHER_SASS, ids=lambda c: c.label())
def test_sass_of_split_k_and_prefill_tiles(other_tile_reports, arch, config):
    _check_sass(other_tile_reports, arch, config)
