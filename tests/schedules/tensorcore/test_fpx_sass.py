"""Every FPx format through every shipped tile, compiled by nvcc/ptxas for sm_90a (and for sm_80 with
-m slow): the Tensor Core path is in the SASS (HMMA, LDSM for X, and LDGSTS: the bit planes arrive by
cp.async), nothing spills or goes to the stack, shared memory fits the arch and the config's own estimate;
W is decoded into registers (ldmatrix only for X) and, for the n16 (decode) tiles on sm_90a, the main loop
issues no more instructions per weight than an H100 can afford while streaming W at full bandwidth."""

from __future__ import annotations

import re

import pytest
import tvm
from tensorcore_cases import check_tensor_core_kernels, once_per_session

from tensorpress.compiler.formats import decode_stage, fpx_layout, get_weight_format
from tensorpress.compiler.formats import fpx_codes as fpx
from tensorpress.schedules.tensorcore.intrinsics import cuda_intrinsics
from tensorpress.schedules.tensorcore.template import schedule_weight_gemm
from tensorpress.schedules.tensorcore.tile_config import SHIPPED_TILES, TileConfig
from tensorpress.schedules.verification.cuda_inspection import (
    CudaBuild,
    KernelReport,
    build_for_inspection,
    kernel_reports,
)
from tensorpress.schedules.verification.sass_cost import parse_listing, steady_state, summarize, weight_budget
from tensorpress.schedules.weight_gemm import make_weight_gemm

# sm_80 builds every format again (~1 min of the default run): with -m slow; sm_90a, the target, always
ARCHS = [pytest.param("sm_80", marks=pytest.mark.slow), "sm_90a"]
FORMATS = ["e3m2", "e2m3", "e2m2", "e3m1", "e2m1"]
CONFIGS = list(SHIPPED_TILES) + [TileConfig(**{**SHIPPED_TILES[0].to_dict(), "split_k": 2})]
M, K = 4096, 4096


def symbol(fmt: str, config: TileConfig) -> str:
    return f"{fmt}_{config.label()}"


# PrimFuncs that scale every weight (row_scale_in_epilogue=False) take the decoded-W-tile path
W_TILE = [(fmt, config) for fmt in ("e3m2", "e2m1") for config in (CONFIGS[0], CONFIGS[-1])]


def module() -> tvm.IRModule:
    """Every (format, config) weight GEMM in one module, and the W-tile cases: one nvcc run per arch."""
    functions = {}
    for fmt, config, in_registers in [(f, c, True) for f in FORMATS for c in CONFIGS] + [(*w, False) for w in W_TILE]:
        func = make_weight_gemm(decode_stage(fmt), M, K, with_bias=True, row_scale_in_epilogue=in_registers)
        name = symbol(fmt, config) + ("" if in_registers else "_wtile")
        main = schedule_weight_gemm(func, config, cuda_intrinsics()).mod["main"]
        functions[name] = main.with_attr("global_symbol", name)
    return tvm.IRModule(functions)


class Compiled:
    """arch -> (CUDA source, {symbol: kernel reports, the GEMM first and the split-K reduction after},
    {kernel name: its SASS instructions}), built on first use, once for all workers."""

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.module: tvm.IRModule | None = None
        self.by_arch: dict = {}

    def __getitem__(self, arch: str):
        if arch not in self.by_arch:
            data = once_per_session(self.tmp_path_factory, f"fpx_sass_{arch}", lambda: self._build(arch))
            build = CudaBuild.from_json(data)
            kernels: dict[str, list[KernelReport]] = {}
            for report in sorted(kernel_reports(build), key=lambda r: r.name):
                kernels.setdefault(report.name.split("_kernel")[0], []).append(report)
            self.by_arch[arch] = (build.source, kernels, parse_listing(build.listing))
        return self.by_arch[arch]

    def _build(self, arch: str) -> dict:
        self.module = self.module or module()
        return build_for_inspection(self.module, arch).to_json()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Compiled:
    return Compiled(tmp_path_factory)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label())
def test_fpx_compiles_to_tensor_core_sass(arch, fmt, config, compiled):
    gemm = check_tensor_core_kernels(compiled[arch][1][symbol(fmt, config)], config, arch)
    # packed planes + one decoded fp16 tile take no more than the dense model the tile heuristics use
    assert gemm.shared_bytes <= config.shared_bytes(), (gemm.shared_bytes, config.shared_bytes())


@pytest.mark.parametrize("arch", ARCHS)
def test_every_plane_travels_by_cp_async(arch, compiled):
    # TVM names a kernel's buffer parameters after the stored arrays: each plane is the source of a
    # cp.async in every kernel that reads it, and is read nowhere else from global memory.
    source = compiled[arch][0]
    copies = [line for line in source.splitlines() if "cp_async" in line]
    for width in (4, 2, 1):
        name = f"{fpx_layout.plane_name(width)}_ptr"
        assert any(name in line for line in copies), name
        loads = [line for line in source.splitlines() if re.search(rf"\b{name}\[", line)]
        assert loads == [], loads[:1]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label())
def test_w_is_decoded_in_registers_within_the_issue_budget(arch, fmt, config, compiled):
    gemm = compiled[arch][1][symbol(fmt, config)][0]
    counts = steady_state(compiled[arch][2][gemm.name], config.block_m * config.block_k // config.threads)
    assert counts is not None, gemm.summary()
    cost = summarize(counts, config)
    # per K tile and warp: one ldmatrix.x4 per 16x16 X tile, none for W
    assert counts["LDSM"] == (config.block_k // 16) * (config.block_n // 16), dict(counts)
    assert cost["HMMA"] == (config.block_k // 16) * (config.block_n // 16) * (config.warp_tile_m // 16) * 2
    if arch == "sm_90a" and config.block_n == 16 and config.split_k == 1:
        spec = get_weight_format(fmt)
        budget = weight_budget(fpx.code_bits(spec.ebits, spec.mbits))
        assert cost["instructions_per_weight"] <= budget, (cost, budget)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt, config", W_TILE, ids=lambda v: v if isinstance(v, str) else v.label())
def test_scale_inside_the_decode_takes_the_w_tile_path(arch, fmt, config, compiled):
    kernels = compiled[arch][1][symbol(fmt, config) + "_wtile"]
    gemm = kernels[0]
    counts = steady_state(compiled[arch][2][gemm.name], config.block_m * config.block_k // config.threads)
    assert counts is not None and counts["STS"] > 0  # the decoded fp16 W tile
    assert counts["LDSM"] > (config.block_k // 16) * (config.block_n // 16)  # ldmatrix for X and W
    for kernel in kernels:
        assert kernel.spill_bytes == 0 and kernel.stack_bytes == 0, kernel.summary()
        assert kernel.sass["LDL"] == 0 and kernel.sass["STL"] == 0, kernel.summary()
