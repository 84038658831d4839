"""tiled-csl (`compiler/formats/tiled_csl.py`) on the Tensor Core template: the tile scatter
(`schedules/tile_scatter.py`, `schedules/tensorcore/scatter_tile.py`) builds each shared W tile from the
stored words. Replayed on the CPU (shuffled threads, NaN-poisoned scratch memory) against numpy at
densities 0, 0.1%, 50% and 100%, odd N, a W tile spanning several 16 x 64 format tiles and half of one
(block_k 32), K padded inside the kernel and split-K; planted bugs (a wrong position bit, an offset off
by one load, a skipped zero-fill) must fail; the SASS on sm_80 and sm_90a (slow)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tensorcore_cases import check_tensor_core_kernels, once_per_session, relative_error, replay_weight_gemm
from tvm import tirx

import tensorpress.schedules.tile_scatter as tile_scatter
from tensorpress.compiler.formats import decode_stage, get_weight_format
from tensorpress.compiler.formats.tiled_csl import TiledCSLDecode
from tensorpress.compiler.pruning import prune
from tensorpress.schedules.decode_stage import TileScatter
from tensorpress.schedules.tensorcore.intrinsics import cuda_intrinsics
from tensorpress.schedules.tensorcore.template import schedule_weight_gemm
from tensorpress.schedules.tensorcore.tile_config import SHIPPED_TILES, TileConfig
from tensorpress.schedules.verification.cuda_inspection import CudaBuild, build_for_inspection, kernel_reports
from tensorpress.schedules.weight_gemm import make_weight_gemm

TOLERANCE = 2e-3  # fp16 output of fp32 sums
SMALL = TileConfig(block_n=16, block_m=64, block_k=128, warps=2, stages=2)  # 4 x 2 format tiles a W tile
HALF = TileConfig(block_n=16, block_m=32, block_k=32, warps=2, stages=2)  # half a format tile along K


def _check(out: np.ndarray, ref: np.ndarray) -> None:
    if not np.abs(ref).max():  # an all-zero weight: the zero-filled tiles, exactly
        assert not np.isnan(out).any() and not out.any()
    else:
        assert relative_error(out, ref) < TOLERANCE


@pytest.mark.parametrize(
    "sparsity, n", [(1.0, 1), (0.999, 17), (0.5, 5), (0.0, 17)], ids=["density0", "density0.1%", "density50%", "dense"]
)
def test_replay_matches_numpy(sparsity, n):
    out, ref = replay_weight_gemm("tiled-csl", 64, 256, n, SMALL, seed=n, sparsity=sparsity, bias=True)
    _check(out, ref)


@pytest.mark.parametrize("config", [HALF, SHIPPED_TILES[-1], TileConfig(16, 64, 64, 2, 2, split_k=2)], ids=str)
def test_replay_other_tiles_padded_k_and_split_k(config):
    # K = 208: not a multiple of 64 (the last format tile is part padding) nor of every config's K slice
    out, ref = replay_weight_gemm("tiled-csl", 64, 208, 5, config, seed=2, sparsity=0.5, shuffle_seed=config.block_m)
    _check(out, ref)


class _PlantedDecode(TiledCSLDecode):
    """tiled-csl's stage with one planted bug in what its tile scatter says."""

    def __init__(self, bug: str):
        super().__init__("tiled-csl")
        scatter = self.tile_scatter
        assert scatter is not None
        if bug == "position bit":  # bit 0 of the position flipped: the value lands one column off
            element = lambda word: scatter.element(word ^ tirx.const(1, "uint32"))  # noqa: E731
            self.tile_scatter = TileScatter(**{**scatter.__dict__, "element": element})
        elif bug == "offset":  # the word range starts one 128-bit load late: a tile's first 4 words missed
            word_range = lambda stored, r, c: (
                scatter.word_range(stored, r, c)[0] + 4,
                scatter.word_range(stored, r, c)[1],
            )  # noqa: E501, E731
            self.tile_scatter = TileScatter(**{**scatter.__dict__, "word_range": word_range})


@pytest.mark.parametrize("bug", ["position bit", "offset"])
def test_planted_scatter_bugs_fail(bug):
    out, ref = replay_weight_gemm("tiled-csl", 64, 256, 5, SMALL, seed=5, sparsity=0.5, stage=_PlantedDecode(bug))
    assert relative_error(out, ref) > 0.05


def test_skipped_zero_fill_fails(monkeypatch):
    """Without the zero-fill the W tile's empty positions keep the NaN poison."""
    monkeypatch.setattr(tile_scatter, "_zero_fill", lambda *args: tirx.Evaluate(0))
    out, ref = replay_weight_gemm("tiled-csl", 64, 256, 5, SMALL, seed=6, sparsity=0.5)
    assert relative_error(out, ref) == float("inf")


SASS_CONFIGS = [SHIPPED_TILES[0], SHIPPED_TILES[-1], TileConfig(**{**SHIPPED_TILES[0].to_dict(), "split_k": 2})]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    def build() -> dict:
        w = prune(np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32), 0.8)
        buffers = get_weight_format("tiled-csl").pack(w).buffers
        functions = {}
        for config in SASS_CONFIGS:
            func = make_weight_gemm(decode_stage("tiled-csl"), 4096, 4096, with_bias=True, buffers=buffers)
            main = schedule_weight_gemm(func, config, cuda_intrinsics()).mod["main"]
            functions[config.label()] = main.with_attr("global_symbol", config.label())
        module = tvm.IRModule(functions)
        return {arch: build_for_inspection(module, arch).to_json() for arch in ("sm_80", "sm_90a")}

    return once_per_session(tmp_path_factory, "tiled_csl_sass", build)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("config", SASS_CONFIGS, ids=lambda c: c.label())
def test_sass_has_the_tensor_core_path(reports, arch, config):
    kernels = sorted(
        (r for r in kernel_reports(CudaBuild.from_json(reports[arch])) if r.name.split("_kernel")[0] == config.label()),
        key=lambda r: r.name,
    )
    gemm = check_tensor_core_kernels(kernels, config, arch)  # HMMA, LDSM, LDGSTS (X), no spill
    assert gemm.sass["LDG"] > 0 and gemm.sass["BAR"] > 0, gemm.summary()  # the words, the fill barrier
