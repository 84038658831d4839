"""Every FPx format through every shipped tile, compiled by nvcc/ptxas for sm_80 and sm_90a: the Tensor
Core path is in the SASS (HMMA, LDSM, and LDGSTS: the bit planes arrive by cp.async), nothing spills
or goes to the stack, shared memory fits the arch and the config's own estimate."""

from __future__ import annotations

import re

import pytest
import tvm

from tensorpress.compiler.formats import fpx_layout
from tensorpress.schedules.tensorcore.arch import arch_spec
from tensorpress.schedules.tensorcore.config import SHIPPED_TILES, TileConfig
from tensorpress.schedules.tensorcore.inspection import (
    KernelReport,
    compile_cubin,
    cuda_source,
    disassemble,
    dynamic_shared_bytes,
    parse_ptxas,
    parse_sass,
)
from tensorpress.schedules.tensorcore.intrinsics import cuda_intrinsics
from tensorpress.schedules.tensorcore.template import schedule_weight_gemm
from tensorpress.schedules.weight_gemm import get_decode_stage, make_weight_gemm

ARCHS = ["sm_80", "sm_90a"]
FORMATS = ["e3m2", "e2m3", "e2m2", "e3m1", "e2m1"]
CONFIGS = list(SHIPPED_TILES) + [TileConfig(**{**SHIPPED_TILES[0].to_dict(), "split_k": 2})]
M, K = 4096, 4096


def symbol(fmt: str, config: TileConfig) -> str:
    return f"{fmt}_{config.label()}"


@pytest.fixture(scope="module")
def module() -> tvm.IRModule:
    """Every (format, config) weight GEMM in one module: one nvcc run per arch."""
    functions = {}
    for fmt in FORMATS:
        for config in CONFIGS:
            func = make_weight_gemm(get_decode_stage(fmt), M, K, with_bias=True)
            main = schedule_weight_gemm(func, config, cuda_intrinsics()).mod["main"]
            functions[symbol(fmt, config)] = main.with_attr("global_symbol", symbol(fmt, config))
    return tvm.IRModule(functions)


@pytest.fixture(scope="module")
def compiled(module) -> dict[str, tuple[str, dict[str, list[KernelReport]]]]:
    """arch -> (CUDA source, {symbol: kernel reports, the GEMM first and the split-K reduction after})."""
    result = {}
    for arch in ARCHS:
        source = cuda_source(module, arch)
        cubin, log = compile_cubin(source, arch)
        ptxas, sass, dyn = parse_ptxas(log), parse_sass(disassemble(cubin)), dynamic_shared_bytes(module, arch)
        kernels: dict[str, list[KernelReport]] = {}
        for name in sorted(ptxas):
            info = ptxas[name]
            kernels.setdefault(name.split("_kernel")[0], []).append(
                KernelReport(
                    name=name, arch=arch, registers=info["registers"], stack_bytes=info["stack"],
                    spill_store_bytes=info["spill_stores"], spill_load_bytes=info["spill_loads"],
                    static_shared_bytes=info["smem"], dynamic_shared_bytes=dyn.get(name, 0), sass=sass[name],
                )
            )  # fmt: skip
        result[arch] = (source, kernels)
    return result


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label())
def test_fpx_compiles_to_tensor_core_sass(arch, fmt, config, compiled):
    kernels = compiled[arch][1][symbol(fmt, config)]
    assert len(kernels) == (1 if config.split_k == 1 else 2), [k.name for k in kernels]
    gemm = kernels[0]
    assert gemm.sass["HMMA"] > 0 and gemm.sass["LDSM"] > 0 and gemm.sass["LDGSTS"] > 0, gemm.summary()
    for kernel in kernels:
        assert kernel.spill_bytes == 0 and kernel.stack_bytes == 0, kernel.summary()
        assert kernel.sass["LDL"] == 0 and kernel.sass["STL"] == 0, kernel.summary()
    assert 0 < gemm.shared_bytes <= arch_spec(arch).shared_bytes_per_block, gemm.summary()
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
