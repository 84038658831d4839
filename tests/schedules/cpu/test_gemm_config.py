"""CPU weight-GEMM configs: the default is today's schedule, every config of a search space computes the
right numbers, and configs that cannot schedule a kernel are refused (and a rule given one falls back)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from cpu_schedule_harness import AVX2, AVX512, compiled, host_has, rng

from tensorpress.compiler.formats import decode_stage, get_weight_format
from tensorpress.errors import ConfigError
from tensorpress.schedules.cpu.decode_along_k import schedule_decode_along_k
from tensorpress.schedules.cpu.gemm_config import (
    CpuGemmConfig,
    check_config,
    default_config,
    panel_max_rows,
    schedule_with_config,
    search_space,
)
from tensorpress.schedules.cpu.register_blocked_gemm import GemmBlocks, RegisterTile, schedule_register_blocked_gemm
from tensorpress.schedules.cpu.vector_unit import vector_unit
from tensorpress.schedules.cpu.weight_gemm import WeightGemm
from tensorpress.schedules.template_config import CPU_WEIGHT_GEMM, stamp_of
from tensorpress.schedules.weight_gemm import N_HINT_ATTR, make_weight_gemm


def _gemm(fmt: str, m: int, k: int, n_hint: int | None):
    func = make_weight_gemm(decode_stage(fmt), m, k, "float32", "float32", with_bias=True)
    return func if n_hint is None else func.with_attr(N_HINT_ATTR, n_hint)


def _without_stamp(func):
    return func.without_attr("tensorpress.template_config").without_attr("tensorpress.config_origin")


@pytest.mark.parametrize(
    "fmt, n_hint, legacy",
    [
        ("dense-fp32-panel", 128, ("panel", 6, 16)),  # AVX2: 6 x 16 register tile
        ("fp6", 1, ("along_k", 1, 4)),  # one token: more weight rows per tile
        ("fp6", 16, ("along_k", 4, 2)),
        ("fp6", 128, ("panel", 6, 16)),  # prefill: the panel
    ],
)
def test_default_config_is_todays_schedule(fmt, n_hint, legacy):
    func = _gemm(fmt, 64, 128, n_hint)
    config = default_config(func, AVX2)
    assert (config.schedule, config.token_tile, config.weight_tile) == legacy
    ruled = WeightGemm().apply(func, AVX2, False)
    assert stamp_of(ruled.mod["main"]) == {"template": CPU_WEIGHT_GEMM, "config": config.to_dict(), "origin": "default"}
    # the same schedule as the rule built before configs existed (the code paths called by hand)
    if legacy[0] == "along_k":
        by_hand = schedule_decode_along_k(func, decode_stage(fmt), n_tile=legacy[1], m_tile=legacy[2])
    else:
        by_hand = tvm.s_tir.Schedule(func)
        blocks = GemmBlocks(by_hand.get_sblock("gemm"), b_source=by_hand.get_sblock("decode"), inline_b=fmt != "fp6")
        schedule_register_blocked_gemm(by_hand, blocks, RegisterTile(6, 16), 8)
    tvm.ir.assert_structural_equal(_without_stamp(ruled.mod["main"]), by_hand.mod["main"])


@pytest.mark.parametrize("fmt, n_hint", [("dense-fp32-panel", 128), ("fp6", 16)])
def test_configs_of_the_search_space_compute_the_gemm(fmt, n_hint):
    m, k = 48, 64
    func = _gemm(fmt, m, k, n_hint)
    space = search_space(func, AVX2)
    assert space[0] == default_config(func, AVX2) and len(space) == len(set(space)) > 8
    schedules = {c.schedule for c in space}
    assert schedules == ({"panel", "along_k"} if fmt == "fp6" else {"panel"})
    g = rng(7)
    weight_format = get_weight_format(fmt)
    packed = weight_format.pack(g.standard_normal((m, k)).astype(np.float32))
    w = weight_format.unpack(packed).astype(np.float64)
    bias = g.standard_normal(m).astype(np.float32)
    x = g.standard_normal((5, k)).astype(np.float32)
    reference = x.astype(np.float64) @ w.T + bias
    # a spread of the space: both ends and the middle (each compile is ~0.3 s)
    for config in [space[0], space[1], space[len(space) // 2], space[-1]]:
        call = compiled(schedule_with_config(func, AVX2, config))
        (y,) = call([x, *packed.arrays.values(), bias], [((5, m), "float32")])
        np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-4, err_msg=config.label())


def _has_block(sch, name: str) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - TVM raises its own error type for a missing block
        return False
    return True


@pytest.mark.parametrize(
    "fmt, target, config",
    [
        ("dense-fp32-panel", AVX2, CpuGemmConfig("panel", 2, 32)),  # 4 vectors over 2 stored panels
        ("dense-fp16-panel", AVX2, CpuGemmConfig("panel", 2, 32)),  # the fp16 -> fp32 cast inlined too
        ("dense-fp32-panel", AVX512, CpuGemmConfig("panel", 8, 48)),  # 3 panels of one vector each
        ("dense-fp32-panel", AVX512, CpuGemmConfig("panel", 5, 32)),  # rows padded to the tile
    ],
)
def test_tiles_wider_than_the_stored_panels_read_them_in_place(fmt, target, config):
    m, k, n = 96, 40, 13
    func = _gemm(fmt, m, k, 128)
    check_config(config, func, target)
    sch = schedule_with_config(func, target, config)
    # no panel packed per call: the decode (a read or a cast of the stored panel) is inlined into the GEMM
    assert not _has_block(sch, "decode")
    # each vector load stays within one stored panel: the tile's columns are unrolled whole vectors
    # (a vector as wide as the tile straddles panels, and LLVM then builds it lane by lane: 3-25x slower)
    *_, vectors, lanes = (sch.get(loop) for loop in sch.get_loops(sch.get_sblock("gemm_update")))
    assert lanes.kind == tvm.tirx.ForKind.VECTORIZED and int(lanes.extent) == vector_unit(target).lanes("float32")
    assert vectors.kind == tvm.tirx.ForKind.UNROLLED and int(vectors.extent) * int(lanes.extent) == config.weight_tile
    if target is AVX512 and not host_has("avx512f"):
        return  # built, not run: this CPU cannot run AVX-512 code
    g = rng(11)
    weight_format = get_weight_format(fmt)
    packed = weight_format.pack(g.standard_normal((m, k)).astype(np.float32))
    w = weight_format.unpack(packed).astype(np.float64)
    bias = g.standard_normal(m).astype(np.float32)
    x = g.standard_normal((n, k)).astype(np.float32)
    (y,) = compiled(sch, target)([x, *packed.arrays.values(), bias], [((n, m), "float32")])
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T + bias, rtol=1e-4, atol=1e-4)


def test_panel_rows_widen_with_the_register_file():
    func = _gemm("dense-fp32-panel", 64, 64, 128)
    for target, rows in ((AVX2, 12), (AVX512, 24)):
        unit = vector_unit(target)
        assert panel_max_rows(unit) == rows
        panels = [c for c in search_space(func, target) if c.schedule == "panel"]
        assert max(c.token_tile for c in panels) == rows
        lanes = unit.lanes("float32")
        for c in panels:  # accumulators + B vectors + the broadcast A value fit the registers
            vectors = c.weight_tile // lanes
            assert c.token_tile * vectors + vectors + 1 <= unit.registers, c.label()
    with pytest.raises(ConfigError, match="vector registers"):
        check_config(CpuGemmConfig("panel", 25, 16), func, AVX512)


@pytest.mark.parametrize(
    "config, words",
    [
        (CpuGemmConfig("panel", 6, 12), "whole vectors"),
        (CpuGemmConfig("panel", 12, 32), "vector registers"),
        (CpuGemmConfig("along_k", 4, 2), "cannot decode along K"),  # dense panels have no word order
        (CpuGemmConfig("row_slots", 8, 8), "row-slot kernels"),
        (CpuGemmConfig("blocked", 1, 8), "unknown schedule"),
    ],
)
def test_configs_that_cannot_schedule_the_kernel_are_refused(config, words):
    with pytest.raises(ConfigError, match=words):
        check_config(config, _gemm("dense-fp32-panel", 64, 64, 128), AVX2)


@pytest.mark.parametrize(
    "params", [{"schedule": "panel", "token_tile": 6}, {"schedule": "panel", "token_tile": "6", "weight_tile": 16}, []]
)
def test_recorded_parameters_are_parsed_strictly(params):
    with pytest.raises(ConfigError):
        CpuGemmConfig.from_dict(params)


class _OneConfig:
    """A ConfigLookup holding one config for every kernel (what a tuning log gives the rule)."""

    def __init__(self, config: dict):
        self.config = config

    def tuned(self, func, template):
        return (self.config, "logs/templates.jsonl") if template == CPU_WEIGHT_GEMM else None


def test_the_rule_uses_a_valid_tuned_config_and_refuses_an_invalid_one():
    func = _gemm("dense-fp32-panel", 64, 64, 128)
    tuned = WeightGemm(_OneConfig({"schedule": "panel", "token_tile": 3, "weight_tile": 8})).apply(func, AVX2, False)
    assert stamp_of(tuned.mod["main"])["origin"] == "logs/templates.jsonl"
    assert stamp_of(tuned.mod["main"])["config"]["token_tile"] == 3
    with pytest.warns(UserWarning, match="logs/templates.jsonl: tuned config .* not used .*whole vectors"):
        refused = WeightGemm(_OneConfig({"schedule": "panel", "token_tile": 3, "weight_tile": 12})).apply(
            func, AVX2, False
        )
    assert stamp_of(refused.mod["main"]) == {
        "template": CPU_WEIGHT_GEMM,
        "config": default_config(func, AVX2).to_dict(),
        "origin": "default",
    }
    with pytest.warns(UserWarning, match="needs exactly the fields"):
        malformed = WeightGemm(_OneConfig({"schedule": "panel"})).apply(func, AVX2, False)
    assert stamp_of(malformed.mod["main"])["origin"] == "default"
