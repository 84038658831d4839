"""Every shipped tile config, compiled by nvcc/ptxas for sm_80 and sm_90a: the Tensor Core path is in
the SASS (HMMA, LDSM, LDGSTS), nothing spills or goes to the stack, shared memory fits the arch."""

from __future__ import annotations

import pytest
from tensorcore_cases import check_tensor_core_kernels, once_per_session

from tensorpress.compiler.formats import decode_stage
from tensorpress.schedules.tensorcore.intrinsics import cuda_intrinsics
from tensorpress.schedules.tensorcore.template import schedule_weight_gemm
from tensorpress.schedules.tensorcore.tile_config import SHIPPED_TILES, TileConfig
from tensorpress.schedules.verification.cuda_inspection import (
    CudaBuild,
    KernelReport,
    build_for_inspection,
    kernel_reports,
    parse_ptxas,
    parse_sass,
)
from tensorpress.schedules.weight_gemm import make_weight_gemm

ARCHS = ["sm_80", "sm_90a"]
CONFIGS = [TileConfig(**{**t.to_dict(), "split_k": s}) for t in SHIPPED_TILES for s in (1, 2)]
M, K = 4096, 4096


def scheduled_module(configs):
    """One module holding the weight GEMM scheduled with each config (one nvcc run per arch)."""
    import tvm

    functions = {}
    for config in configs:
        func = make_weight_gemm(decode_stage("dense-fp16"), M, K, with_bias=True)
        main = schedule_weight_gemm(func, config, cuda_intrinsics()).mod["main"]
        functions[config.label()] = main.with_attr("global_symbol", config.label())
    return tvm.IRModule(functions)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict[str, list[KernelReport]]]:
    """arch -> config label -> kernel reports (the GEMM kernel first, the split-K reduction after);
    built once for all workers."""

    def build() -> dict:
        module = scheduled_module(CONFIGS)
        return {arch: build_for_inspection(module, arch).to_json() for arch in ARCHS}

    builds = once_per_session(tmp_path_factory, "template_sass", build)
    result: dict[str, dict[str, list[KernelReport]]] = {}
    for arch in ARCHS:
        by_config: dict[str, list[KernelReport]] = {c.label(): [] for c in CONFIGS}
        for report in sorted(kernel_reports(CudaBuild.from_json(builds[arch])), key=lambda r: r.name):
            by_config[report.name.split("_kernel")[0]].append(report)
        result[arch] = by_config
    return result


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label())
def test_shipped_config_compiles_to_tensor_core_sass(arch, config, reports):
    gemm = check_tensor_core_kernels(reports[arch][config.label()], config, arch)
    # the config's own estimate (what validate() and the heuristics use) is not optimistic
    assert gemm.dynamic_shared_bytes <= config.shared_bytes(), (gemm.dynamic_shared_bytes, config.shared_bytes())


def test_ptxas_and_sass_parsers_read_the_tool_formats():
    log = (
        "ptxas info    : Compiling entry function 'k_kernel' for 'sm_90a'\n"
        "ptxas info    : Function properties for k_kernel\n"
        "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 96 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]\n"
    )
    assert parse_ptxas(log) == {
        "k_kernel": {"registers": 96, "stack": 8, "spill_stores": 4, "spill_loads": 12, "smem": 1024}
    }
    listing = (
        "\tFunction : k_kernel\n"
        "        /*0000*/                   LDC R1, c[0x0][0x28] ;           /* 0x00000a00ff017b82 */\n"
        "        /*0010*/              @!P0 LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;\n"
        "        /*0020*/                   HMMA.16816.F32 R8, R12, R16, R8 ;\n"
        "        /*0030*/                   HMMA.16816.F32 R4, R12, R18, R4 ;\n"
    )
    assert parse_sass(listing)["k_kernel"] == {"LDC": 1, "LDGSTS": 1, "HMMA": 2}
