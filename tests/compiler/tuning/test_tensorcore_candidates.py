"""The candidate tile configs a CUDA tuning kit builds: valid for the arch and the shape, the untuned
choice first, reproducible; a sample of them scheduled and built for sm_90a by nvcc runs the Tensor Core
path without spills within the arch's shared memory (slow: nvcc)."""

from __future__ import annotations

import pytest

from tensorpress.compiler.formats import decode_stage
from tensorpress.compiler.tuning.tensorcore_candidates import fits_shared_memory, tensorcore_candidates
from tensorpress.schedules.tensorcore.arch import arch_spec
from tensorpress.schedules.tensorcore.tile_config import TileConfig, choose_config, search_space
from tensorpress.schedules.weight_gemm import make_weight_gemm

TOKENS = (1, 16, 64)


# each drawn config is scheduled and lowered to read its shared memory (~1 s): one shape by default
@pytest.mark.parametrize(
    ("fmt", "m", "k"),
    [
        ("e3m2", 8192, 8192),
        pytest.param("dense-fp16", 28672, 8192, marks=pytest.mark.slow),
        pytest.param("e3m2", 256, 512, marks=pytest.mark.slow),
    ],
)
def test_candidates_are_valid_configs_of_the_space_with_the_defaults_first(fmt, m, k):
    arch = arch_spec("sm_90a")
    func = make_weight_gemm(decode_stage(fmt), m, k)
    candidates = tensorcore_candidates(func, "sm_90a", TOKENS, count=6, seed=3)
    defaults = []
    for n in TOKENS:
        if choose_config(m, k, arch, n).to_dict() not in defaults:
            defaults.append(choose_config(m, k, arch, n).to_dict())
    assert candidates[: len(defaults)] == defaults
    assert len(candidates) == 6 and len({tuple(sorted(c.items())) for c in candidates}) == 6
    space = [c.to_dict() for c in search_space(m, k, arch)]
    for config in candidates:
        tile = TileConfig(**config)
        tile.validate(arch)  # raises on any broken rule of the template or the arch
        tile.check_shape(m, k)
        assert config in space or config in defaults
        assert tile.block_n <= 64
    assert tensorcore_candidates(func, "sm_90a", TOKENS, count=6, seed=3) == candidates  # seeded: a rerun agrees


def test_a_config_over_the_shared_memory_of_a_block_is_left_out():
    func = make_weight_gemm(decode_stage("dense-fp16"), 4096, 4096)
    small = TileConfig(block_n=16, block_m=64, block_k=64, warps=4, stages=2)
    # 5 stages of a 64-token x 256-row x 128-deep tile: ~410 KB of shared memory, over the 227 KB of sm_90a
    huge = TileConfig(block_n=64, block_m=256, block_k=128, warps=8, stages=5)
    assert fits_shared_memory(func, small, "sm_90a")
    assert not fits_shared_memory(func, huge, "sm_90a")


@pytest.mark.slow
def test_a_sample_of_candidates_builds_for_sm_90a_on_the_tensor_core_path():
    import tvm

    from tensorpress.schedules.tensorcore.intrinsics import cuda_intrinsics
    from tensorpress.schedules.tensorcore.template import schedule_weight_gemm
    from tensorpress.schedules.verification.cuda_inspection import inspect_cuda

    limit = arch_spec("sm_90a").shared_bytes_per_block
    for fmt in ("e3m2", "dense-fp16"):
        func = make_weight_gemm(decode_stage(fmt), 8192, 8192)
        candidates = tensorcore_candidates(func, "sm_90a", TOKENS, count=6, seed=0)[2:]  # past the shipped ones
        functions = {
            f"c{j}": schedule_weight_gemm(func, TileConfig(**c), cuda_intrinsics())
            .mod["main"]
            .with_attr("global_symbol", f"c{j}")
            for j, c in enumerate(candidates)
        }
        reports = inspect_cuda(tvm.IRModule(functions), "sm_90a")
        main = [r for r in reports if r.sass["HMMA"]]
        assert len(main) == len(candidates), [r.summary() for r in reports]
        for report in main:
            assert report.sass["LDSM"] > 0 and report.sass["LDGSTS"] > 0, report.summary()
            assert report.spill_bytes == 0 and report.shared_bytes <= limit, report.summary()
