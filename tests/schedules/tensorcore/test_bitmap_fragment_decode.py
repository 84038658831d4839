"""bitmap's fragment decode (`BitmapDecode.fragment_pair`): each lane decodes its B-fragment pairs from
the staged bit words, the tile offset and the values, no W tile. Replayed on the CPU against numpy
(shuffled threads, NaN-poisoned buffers) at any density, odd N and K past the last tile; planted bugs
must fail; the template takes it above FRAGMENT_MIN_DENSITY and the scatter up to it; built by nvcc: the
Tensor Core path is in the SASS, ldmatrix for X only, the bits by cp.async, nothing spilled."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tensorcore_cases import (
    SMALL,
    check_tensor_core_kernels,
    once_per_session,
    relative_error,
    replay_weight_gemm,
)

from tensorpress.compiler.formats import bitmap, decode_stage, get_weight_format
from tensorpress.compiler.formats.bitmap import BitmapDecode
from tensorpress.compiler.pruning import prune
from tensorpress.schedules.tensorcore import fragment_decode
from tensorpress.schedules.tensorcore.intrinsics import cuda_intrinsics
from tensorpress.schedules.tensorcore.template import builds_w_by_scatter, find_blocks, schedule_weight_gemm
from tensorpress.schedules.tensorcore.tile_config import SHIPPED_TILES, TileConfig
from tensorpress.schedules.verification.cuda_inspection import CudaBuild, build_for_inspection, kernel_reports
from tensorpress.schedules.verification.sass_cost import parse_listing, steady_state
from tensorpress.schedules.verification.tensorcore_emulation import emulated_intrinsics
from tensorpress.schedules.weight_gemm import make_weight_gemm

CONFIGS = list(SHIPPED_TILES) + [TileConfig(**{**SHIPPED_TILES[0].to_dict(), "split_k": 2})]
TOLERANCE = 2e-3  # fp16 output of fp32 sums


class FragmentAlways(BitmapDecode):
    """bitmap whose template takes fragment decode at every density (the shipped stage: above 33 %)."""

    def fragment_decode_preferred(self, stored, m, k):
        return True


def replay(m, k, n, config, sparsity, seed=3, stage=None):
    stage = stage or FragmentAlways("bitmap")
    return replay_weight_gemm("bitmap", m, k, n, config, seed=seed, bias=True, sparsity=sparsity, stage=stage)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label())
def test_replay_matches_numpy(config):
    out, ref = replay(max(config.block_m, 64), 256, 19, config, 0.5)
    assert relative_error(out, ref) < TOLERANCE


@pytest.mark.parametrize("sparsity", [0.0, 0.001, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("n", [1, 7])
def test_replay_at_any_density(sparsity, n):
    out, ref = replay(64, 256, n, SHIPPED_TILES[1], sparsity, seed=n)
    assert relative_error(out, ref) < TOLERANCE


# K past the last stored 64-column tile (K = 144: 3 tiles, K tiles of 128 read a 4th), K < 64, split-K
@pytest.mark.parametrize(
    "config, m, k",
    [(SHIPPED_TILES[1], 64, 144), (SHIPPED_TILES[2], 32, 144), (SHIPPED_TILES[0], 128, 48), (CONFIGS[-1], 128, 208)],
    ids=lambda v: v.label() if isinstance(v, TileConfig) else str(v),
)
def test_replay_odd_shapes(config, m, k):
    out, ref = replay(m, k, 5, config, 0.5, seed=k)
    assert relative_error(out, ref) < TOLERANCE


def _schedule(sparsity: float, config: TileConfig):
    w = prune(np.random.default_rng(0).standard_normal((128, 256)).astype(np.float32), sparsity)
    buffers = get_weight_format("bitmap").pack(w).buffers
    func = make_weight_gemm(decode_stage("bitmap"), 128, 256, buffers=buffers)
    return func, schedule_weight_gemm(func, config, emulated_intrinsics())


@pytest.mark.parametrize(
    "sparsity, config, fragment",
    [
        (0.4, SHIPPED_TILES[0], True),
        (0.2, SHIPPED_TILES[1], True),
        (0.5, SHIPPED_TILES[0], True),
        (0.65, SHIPPED_TILES[0], True),
        (0.7, SHIPPED_TILES[0], False),
        (0.8, SHIPPED_TILES[0], False),
        (0.2, SMALL, False),
    ],
    ids=["40%", "20%", "50%", "65%", "70%: scatter", "80%: scatter", "block_k 32: scatter"],
)
def test_the_template_takes_fragment_decode_from_its_density_up(sparsity, config, fragment):
    func, sch = _schedule(sparsity, config)
    # the fragment-decode block holds the lane's decoded pairs (`fragment_decode.py`)
    decoding = find_blocks(sch, lambda b: any(str(buf.name) == "decoded" for buf in b.alloc_buffers))
    assert bool(decoding) == fragment
    assert builds_w_by_scatter(func, config) == (not fragment)


def test_the_planted_bugs_driver_passes_without_a_bug():
    out, ref = replay(64, 256, 5, SHIPPED_TILES[1], 0.5, seed=5)
    assert relative_error(out, ref) < TOLERANCE


def _off_by_one_popcount(rank):
    return lambda *args: (lambda r, word, shift: (r + 1, word, shift))(*rank(*args))


def _wrong_position_bit(rank):
    return lambda *args: (lambda r, word, shift: (r, word, shift ^ tvm.tirx.const(2, "uint32")))(*rank(*args))


def _missed_tile(rank):  # every K tile of a row of tiles decoded from its first tile
    return lambda bits, offsets, row, col, bind, above: rank(bits, offsets, row, col % bitmap.TILE_COLS, bind, above)


@pytest.mark.parametrize("bug", [_off_by_one_popcount, _wrong_position_bit, _missed_tile])
def test_planted_bugs_fail(monkeypatch, bug):
    monkeypatch.setattr(bitmap, "fragment_rank", bug(bitmap.fragment_rank))
    out, ref = replay(64, 256, 5, SHIPPED_TILES[1], 0.5, seed=5)
    assert relative_error(out, ref) > 0.05


# The rows above a pair come from the template's scan of the lanes' row counts (`fragment_decode.py`).


def _row_count_off_by_one(count):
    return lambda bits, row, col0, bind: count(bits, row, col0, bind) + 1


def _row_count_of_the_next_tile(count):  # the counts read from the next K tile's words
    return lambda bits, row, col0, bind: count(bits, row, col0 + bitmap.TILE_COLS, bind)


@pytest.mark.parametrize("bug", [_row_count_off_by_one, _row_count_of_the_next_tile])
def test_planted_row_count_bugs_fail(monkeypatch, bug):
    monkeypatch.setattr(bitmap, "fragment_row_count", bug(bitmap.fragment_row_count))
    out, ref = replay(64, 256, 5, SHIPPED_TILES[1], 0.5, seed=5)
    assert relative_error(out, ref) > 0.05


@pytest.mark.parametrize("deltas", [(4, 8), (4, 8, 8), (1, 2, 4)], ids=["a step short", "a step twice", "by lanes"])
def test_planted_scan_bugs_fail(monkeypatch, deltas):
    monkeypatch.setattr(fragment_decode, "ROW_SCAN_DELTAS", deltas)
    out, ref = replay(64, 256, 5, SHIPPED_TILES[1], 0.5, seed=5)
    assert relative_error(out, ref) > 0.05


# -- SASS ----------------------------------------------------------------------------------------------

ARCHS = [pytest.param("sm_80", marks=pytest.mark.slow), pytest.param("sm_90a", marks=pytest.mark.slow)]  # 25 s each


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    def build(arch: str) -> dict:
        w = prune(np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32), 0.4)
        buffers = get_weight_format("bitmap").pack(w).buffers
        functions = {}
        for config in CONFIGS:
            func = make_weight_gemm(decode_stage("bitmap"), 4096, 4096, with_bias=True, buffers=buffers)
            assert not builds_w_by_scatter(func, config)
            main = schedule_weight_gemm(func, config, cuda_intrinsics()).mod["main"]
            functions[config.label()] = main.with_attr("global_symbol", config.label())
        return build_for_inspection(tvm.IRModule(functions), arch).to_json()

    class Lazy(dict):
        def __missing__(self, arch):
            data = once_per_session(tmp_path_factory, f"bitmap_fragment_{arch}", lambda: build(arch))
            self[arch] = CudaBuild.from_json(data)
            return self[arch]

    return Lazy()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label())
def test_sass_decodes_w_in_registers(reports, arch, config):
    build = reports[arch]
    kernels = sorted(
        (r for r in kernel_reports(build) if r.name.split("_kernel")[0] == config.label()), key=lambda r: r.name
    )
    gemm = check_tensor_core_kernels(kernels, config, arch)  # HMMA, LDSM, LDGSTS; 0 spills, no stack
    counts = steady_state(parse_listing(build.listing)[gemm.name], config.block_m * config.block_k // config.threads)
    assert counts is not None, gemm.summary()
    assert counts["LDSM"] == (config.block_k // 16) * (config.block_n // 16), dict(counts)  # X only, none for W
    units = (config.warp_tile_m // 16) * (config.block_k // bitmap.TILE_COLS)  # a warp's per K tile
    assert counts["SHFL"] == 4 * units, dict(counts)  # the row scan: 3 up and 1 broadcast a unit
    # a lane counts its 2 rows (4) and each pair's bits below it (16), not the rows above (30 more before)
    assert 0 < counts["POPC"] <= 24 * units, dict(counts)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_bits_travel_by_cp_async_and_the_values_are_read_in_place(reports, arch):
    # TVM names a kernel's buffer parameters after the stored arrays
    lines = reports[arch].source.splitlines()
    assert any("bits_ptr" in line for line in lines if "cp_async" in line)
    assert not [line for line in lines if "bits_ptr[" in line]  # no global read of the bits but the copy
    assert [line for line in lines if "values_ptr[" in line]
