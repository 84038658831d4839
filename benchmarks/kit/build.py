"""Build the kit's kernel libraries with TVM (this machine: nvcc, no GPU needed).

CUDA kernels are the Tensor Core template with the PTX intrinsics, compiled to fatbins by nvcc (the
stub-driver toolchain of `tensorpress.compiler.cuda`). Dry-run kernels are the same template with the
emulated intrinsics, replayed on the CPU: built for llvm, slow, but numerically the same program.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from benchmarks.kit.cases import (
    BITMAP_TEST_SHAPES,
    DRY_BITMAP_TEST_SHAPES,
    DRY_FPX_TEST_SHAPES,
    FPX_TEST_FORMATS,
    FPX_TEST_SHAPES,
    SPARSE_FPX_FORMAT,
    TILED_CSL_FORMAT,
    KernelCase,
    bitmap_fpx_stream_capacity,
    bitmap_value_capacity,
    case,
    tiled_csl_word_capacity,
)

SPLIT_CHOICES = (1, 2, 4, 8)


def bench_cases(layers: dict[str, tuple[int, int]], tokens, arch: str) -> tuple[list[KernelCase], dict]:
    """Candidates to time per layer: the untuned choice for every N, plus each shipped tile with a
    few split-K values (the GPU run finds the best; the choice heuristic learns from it).

    Returns (cases, defaults) with defaults[layer][N] = the name of the untuned choice's kernel."""
    return _candidates("dense-fp16", layers, tokens, arch, SPLIT_CHOICES, decode_tiles_only=False)


FPX_SPLIT_CHOICES = (1, 2, 4)


def fpx_bench_cases(fmt: str, layers: dict[str, tuple[int, int]], tokens, arch: str) -> tuple[list[KernelCase], dict]:
    """FPx candidates per layer for the stage `fmt` (e3m2, ...): the untuned choice for every N, plus
    every decode-sized shipped tile (block_n 16) with a few split-K values. Returns (cases, defaults)
    like `bench_cases`."""
    return _candidates(fmt, layers, tokens, arch, FPX_SPLIT_CHOICES, decode_tiles_only=True)


BITMAP_SPLIT_CHOICES = (1,)


def bitmap_bench_cases(layers: dict[str, tuple[int, int]], tokens, arch: str) -> tuple[list[KernelCase], dict]:
    """bitmap candidates per layer: the untuned choice for every N plus every decode-sized shipped tile
    (block_n 16) without split-K (its decode is popcount-bound, not short of CTAs). Returns (cases,
    defaults) like `bench_cases`; one kernel serves every sparsity (`cases.bitmap_value_capacity`)."""
    return _candidates("bitmap", layers, tokens, arch, BITMAP_SPLIT_CHOICES, decode_tiles_only=True)


def bitmap_fpx_bench_cases(layers: dict[str, tuple[int, int]], tokens, arch: str) -> tuple[list[KernelCase], dict]:
    """Sparse x FPx (bitmap-e3m2) candidates per layer, chosen as bitmap's (`bitmap_bench_cases`)."""
    return _candidates(SPARSE_FPX_FORMAT, layers, tokens, arch, BITMAP_SPLIT_CHOICES, decode_tiles_only=True)


def tiled_csl_bench_cases(layers: dict[str, tuple[int, int]], tokens, arch: str) -> tuple[list[KernelCase], dict]:
    """tiled-csl candidates per layer, chosen as bitmap's (`bitmap_bench_cases`); one kernel serves every
    sparsity (`cases.tiled_csl_word_capacity`)."""
    return _candidates(TILED_CSL_FORMAT, layers, tokens, arch, BITMAP_SPLIT_CHOICES, decode_tiles_only=True)


def bitmap_test_cases(dry: bool) -> list[KernelCase]:
    """The bitmap gpu tests' kernels (tests/schedules/tensorcore/test_bitmap_gpu.py): the shipped
    decode tiles with split-K 1 and 2 on each test shape, the prefill tile, and one with bias."""
    from tensorpress.schedules.tensorcore.tile_config import SHIPPED_TILES, TileConfig

    if dry:
        small = TileConfig(block_n=16, block_m=32, block_k=64, warps=2, stages=2)
        fallback = replace(SHIPPED_TILES[-1], stages=2)  # the 16-row tile, on a layer of part bitmap tiles
        cases = [case("bitmap", m, k, replace(small, split_k=s).to_dict(), bias=s == 2)
                 for m, k in DRY_BITMAP_TEST_SHAPES for s in (1, 2)]  # fmt: skip
        return [*cases, case("bitmap", 48, 208, fallback.to_dict())]
    cases = []
    for m, k in BITMAP_TEST_SHAPES:
        for tile in SHIPPED_TILES:
            if m % tile.block_m and tile is not SHIPPED_TILES[-1]:
                continue  # the 16-row tile takes any M
            for split_k in (1, 2) if tile.block_n == 16 else (1,):
                cases.append(case("bitmap", m, k, replace(tile, split_k=split_k).to_dict()))
    cases.append(case("bitmap", 256, 512, SHIPPED_TILES[0].to_dict(), bias=True))
    return cases


def _candidates(
    fmt: str, layers: dict[str, tuple[int, int]], tokens, arch: str, split_choices, decode_tiles_only: bool
) -> tuple[list[KernelCase], dict]:
    from tensorpress.schedules.tensorcore.arch import arch_spec
    from tensorpress.schedules.tensorcore.tile_config import SHIPPED_TILES, choose_config

    spec = arch_spec(arch)
    cases: dict[str, KernelCase] = {}
    defaults: dict[str, dict[int, str]] = {}
    for layer, (m, k) in layers.items():
        defaults[layer] = {}
        for n in tokens:
            chosen = case(fmt, m, k, choose_config(m, k, spec, n).to_dict())
            cases[chosen.name] = chosen
            defaults[layer][n] = chosen.name
        for tile in SHIPPED_TILES:
            if decode_tiles_only and tile.block_n != 16:
                continue
            if m % tile.block_m or tile.block_m == 16 and m >= 1024:
                continue  # the 16-row tile is the small-M fallback
            for split_k in split_choices:
                config = replace(tile, split_k=split_k)
                if config.padded_k(k) // split_k < 2 * config.block_k:
                    continue
                explore = case(fmt, m, k, config.to_dict())
                cases[explore.name] = explore
    return list(cases.values()), defaults


def fpx_test_cases(dry: bool) -> list[KernelCase]:
    """The FPx gpu tests' kernels (tests/schedules/tensorcore/test_fpx_gpu.py): every test format
    with every shipped tile that fits, split-K 1 and 2, on a small and a real layer, and one with bias."""
    from tensorpress.schedules.tensorcore.tile_config import SHIPPED_TILES, TileConfig

    if dry:
        small = TileConfig(block_n=16, block_m=32, block_k=64, warps=2, stages=2)
        return [case(fmt, m, k, replace(small, split_k=2 if fmt == "e2m1" else 1).to_dict(), bias=fmt == "e3m2")
                for fmt in FPX_TEST_FORMATS for m, k in DRY_FPX_TEST_SHAPES]  # fmt: skip
    cases = []
    for fmt in FPX_TEST_FORMATS:
        for m, k in FPX_TEST_SHAPES:
            for tile in SHIPPED_TILES:
                for split_k in (1, 2):
                    cases.append(case(fmt, m, k, replace(tile, split_k=split_k).to_dict()))
        cases.append(case(fmt, 256, 512, SHIPPED_TILES[0].to_dict(), bias=True))
    return cases


def test_cases(dry: bool) -> list[KernelCase]:
    """The gpu tests' kernels: every shipped tile with and without split-K on a small and a real
    layer, a shape that needs K padding, and bias; a few small ones for the dry run."""
    from tensorpress.schedules.tensorcore.tile_config import SHIPPED_TILES, TileConfig

    if dry:
        small = TileConfig(block_n=16, block_m=64, block_k=32, warps=2, stages=2)
        return [
            case("dense-fp16", 128, 256, small.to_dict()),
            case("dense-fp16", 128, 256, replace(small, split_k=2).to_dict(), bias=True),
            case("dense-fp16", 48, 80, replace(SHIPPED_TILES[-1], stages=2).to_dict()),
        ]
    cases = []
    for m, k in [(256, 512), (4096, 4096)]:
        for tile in SHIPPED_TILES:
            for split_k in (1, 2):
                cases.append(case("dense-fp16", m, k, replace(tile, split_k=split_k).to_dict()))
    cases.append(case("dense-fp16", 256, 512, SHIPPED_TILES[0].to_dict(), bias=True))
    cases.append(case("dense-fp16", 256, 512, replace(SHIPPED_TILES[4], split_k=2).to_dict(), bias=True))
    for split_k in (1, 2):
        cases.append(case("dense-fp16", 48, 80, replace(SHIPPED_TILES[-1], split_k=split_k).to_dict()))
    return cases


def scheduled_module(cases: list[KernelCase], emulated: bool):
    """One IRModule with a function per case, named case.name."""
    import tvm

    from tensorpress.compiler.formats import decode_stage
    from tensorpress.schedules.tensorcore.intrinsics import cuda_intrinsics
    from tensorpress.schedules.tensorcore.template import schedule_weight_gemm
    from tensorpress.schedules.tensorcore.tile_config import TileConfig
    from tensorpress.schedules.verification.tensorcore_emulation import emulated_intrinsics
    from tensorpress.schedules.weight_gemm import make_weight_gemm

    intrinsics = emulated_intrinsics() if emulated else cuda_intrinsics()
    functions = {}
    for c in cases:
        buffers = sparse_buffers(c.fmt, c.m, c.k)
        func = make_weight_gemm(decode_stage(c.fmt), c.m, c.k, with_bias=c.bias, buffers=buffers)
        main = schedule_weight_gemm(func, TileConfig(**c.config_dict), intrinsics).mod["main"]
        functions[c.name] = main.with_attr("global_symbol", c.name)
    return tvm.IRModule(functions)


def sparse_buffers(fmt: str, m: int, k: int) -> list | None:
    """The stored buffers of the kit's sparse kernels (their sizes follow the kit's capacity, not a
    weight), or None for a format whose buffers follow from the shape."""
    if fmt == "bitmap":
        return bitmap_buffers(m, k)
    if fmt == SPARSE_FPX_FORMAT:
        return bitmap_fpx_buffers(m, k)
    if fmt == TILED_CSL_FORMAT:
        return tiled_csl_buffers(m, k)
    return None


def tiled_csl_buffers(m: int, k: int) -> list:
    """The stored buffers of the kit's tiled-csl kernels for an [m, k] layer (`compiler/formats/tiled_csl.py`);
    "words" has the kit's capacity (`cases.tiled_csl_word_capacity`), whatever the sparsity."""
    from tensorpress.compiler.formats.bitmap import tile_grid
    from tensorpress.schedules.decode_stage import StoredBuffer

    tm, tk = tile_grid(m, k)
    return [
        StoredBuffer("words", (tiled_csl_word_capacity(m, k),), "uint32"),
        StoredBuffer("offsets", (tm, tk + 1), "int32"),
    ]


def bitmap_fpx_buffers(m: int, k: int) -> list:
    """The stored buffers of the kit's bitmap-e3m2 kernels for an [m, k] layer: bitmap's bits and
    offsets, the code stream at the kit's capacity (`cases.bitmap_fpx_stream_capacity`), scales."""
    from tensorpress.compiler.formats import code_stream, get_weight_format
    from tensorpress.compiler.formats.bitmap import WORDS_PER_TILE, tile_grid
    from tensorpress.schedules.decode_stage import StoredBuffer

    tm, tk = tile_grid(m, k)
    shape = code_stream.stream_shape(bitmap_fpx_stream_capacity(m, k), get_weight_format(SPARSE_FPX_FORMAT).code_bits())
    return [
        StoredBuffer("bits", (tm, tk, WORDS_PER_TILE), "uint32"),
        StoredBuffer("offsets", (tm, tk), "int32"),
        StoredBuffer(code_stream.NAME, shape, "uint32"),
        StoredBuffer("scales", (m,), "float16"),
    ]


def bitmap_buffers(m: int, k: int) -> list:
    """The stored buffers of the kit's bitmap kernels for an [m, k] layer (`compiler/formats/bitmap.py`);
    "values" has the kit's capacity (`cases.bitmap_value_capacity`), whatever the sparsity."""
    from tensorpress.compiler.formats.bitmap import WORDS_PER_TILE, tile_grid
    from tensorpress.schedules.decode_stage import StoredBuffer

    tm, tk = tile_grid(m, k)
    return [
        StoredBuffer("bits", (tm, tk, WORDS_PER_TILE), "uint32"),
        StoredBuffer("offsets", (tm, tk), "int32"),
        StoredBuffer("values", (bitmap_value_capacity(m, k),), "float16"),
    ]


def build_library(cases: list[KernelCase], out: Path, arch: str | None) -> float:
    """Compile `cases` into one shared library at `out`: CUDA fatbins for `arch`, or (arch None)
    the CPU replay for the dry run (`tensorpress.compiler.cuda.kernel_library`). Returns the seconds."""
    from tensorpress.compiler.cuda.kernel_library import compile_kernel_library

    return compile_kernel_library(scheduled_module(cases, emulated=arch is None), out, arch)
