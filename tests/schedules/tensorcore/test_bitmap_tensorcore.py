"""bitmap sparse weights (`compiler/formats/bitmap.py`) on the Tensor Core template: the plain decode
(bits, tile offset and values read from global memory) fills the fp16 W tile the mma reads. Replayed
on the CPU against numpy for every shipped tile (and split-K), weights pruned 80% by magnitude; built
by nvcc for sm_80 and sm_90a: the Tensor Core path is in the SASS and nothing spills."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tensorcore_cases import check_tensor_core_kernels, once_per_session, relative_error, replay_weight_gemm

from tensorpress.compiler.formats import decode_stage, get_weight_format
from tensorpress.compiler.pruning import prune
from tensorpress.schedules.tensorcore.intrinsics import cuda_intrinsics
from tensorpress.schedules.tensorcore.template import schedule_weight_gemm
from tensorpress.schedules.tensorcore.tile_config import SHIPPED_TILES, TileConfig
from tensorpress.schedules.verification.cuda_inspection import CudaBuild, build_for_inspection, kernel_reports
from tensorpress.schedules.weight_gemm import make_weight_gemm

CONFIGS = list(SHIPPED_TILES) + [TileConfig(**{**SHIPPED_TILES[0].to_dict(), "split_k": 2})]
TOLERANCE = 2e-3  # fp16 output of fp32 sums


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label())
def test_replay_matches_numpy(config):
    m = max(config.block_m, 64)
    out, ref = replay_weight_gemm("bitmap", m, 256, 19, config, seed=3, bias=True)
    assert relative_error(out, ref) < TOLERANCE


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    def build() -> dict:
        w = prune(np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32), 0.8)
        buffers = get_weight_format("bitmap").pack(w).buffers
        functions = {}
        for config in CONFIGS:
            func = make_weight_gemm(decode_stage("bitmap"), 4096, 4096, with_bias=True, buffers=buffers)
            main = schedule_weight_gemm(func, config, cuda_intrinsics()).mod["main"]
            functions[config.label()] = main.with_attr("global_symbol", config.label())
        module = tvm.IRModule(functions)
        return {arch: build_for_inspection(module, arch).to_json() for arch in ("sm_80", "sm_90a")}

    return once_per_session(tmp_path_factory, "bitmap_sass", build)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label())
def test_sass_has_the_tensor_core_path(reports, arch, config):
    kernels = sorted(
        (r for r in kernel_reports(CudaBuild.from_json(reports[arch])) if r.name.split("_kernel")[0] == config.label()),
        key=lambda r: r.name,
    )
    check_tensor_core_kernels(kernels, config, arch)
