"""The rule that hands weight GEMMs for CUDA to the Tensor Core template, and `compile --target cuda`
actually using it (the built library's weight-GEMM kernels carry LDGSTS + LDSM + HMMA)."""

from __future__ import annotations

import subprocess

import pytest
import tvm
from reference_models import build, example_inputs
from tvm import te

import tensorpress
from tensorpress.compiler.cuda.toolchain import extract_fatbins
from tensorpress.compiler.formats import decode_stage
from tensorpress.runtime.artifact import LIBRARY, open_artifact
from tensorpress.schedules.rules import rules_for
from tensorpress.schedules.tensorcore.rule import N_HINT_ATTR, WeightGemmTensorCore
from tensorpress.schedules.verification.cuda_inspection import find_tool, parse_sass
from tensorpress.schedules.weight_gemm import make_weight_gemm


def cuda(arch: str) -> tvm.target.Target:
    return tvm.target.Target({"kind": "cuda", "arch": arch})


def dense(m=256, k=512, **kwargs):
    return make_weight_gemm(decode_stage("dense-fp16"), m, k, **kwargs)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a"])
def test_rule_schedules_weight_gemm_for_cuda(arch):
    sch = WeightGemmTensorCore().apply(dense(), cuda(arch), False)
    assert sch is not None
    script = sch.mod["main"].script()
    assert "blockIdx.x" in script and "ptx_legacy.mma" in script and "ptx_legacy.ldmatrix" in script


def test_rule_declines_what_it_cannot_take():
    rule = WeightGemmTensorCore()
    assert rule.apply(dense(), tvm.target.Target("llvm"), False) is None
    assert rule.apply(dense(), cuda("sm_75"), False) is None  # no cp.async / m16n8k16 before sm_80
    assert rule.apply(dense(m=72), cuda("sm_80"), False) is None  # M not a multiple of 16
    fp32 = make_weight_gemm(decode_stage("dense-fp32"), 64, 64, act_dtype="float32")
    assert rule.apply(fp32, cuda("sm_80"), False) is None
    x = te.placeholder((64, 64), "float16")
    other = te.create_prim_func([x, te.compute((64, 64), lambda i, j: x[i, j] * 2)])
    assert rule.apply(other, cuda("sm_80"), False) is None


def test_token_hint_attribute_picks_the_token_tile():
    rule = WeightGemmTensorCore()
    assert rule.config_for(dense(), cuda("sm_90a")).block_n == 16
    assert rule.config_for(dense().with_attr(N_HINT_ATTR, 64), cuda("sm_90a")).block_n == 64


def test_rule_comes_before_dlight_for_cuda():
    rules = rules_for(cuda("sm_80"))
    ours = [i for i, r in enumerate(rules) if isinstance(r, WeightGemmTensorCore)]
    theirs = [i for i, r in enumerate(rules) if not type(r).__module__.startswith("tensorpress.")]
    theirs += [i for i, r in enumerate(rules) if type(getattr(r, "rule", None)).__module__.startswith("tvm.")]
    assert len(ours) == 1 and ours[0] < min(theirs)
    assert not any(isinstance(r, WeightGemmTensorCore) for r in rules_for(tvm.target.Target("llvm")))


def test_compile_for_cuda_uses_the_template_for_linear_layers(tmp_path):
    # sm_90a: the arch whose name dlight cannot parse (it would fall back to SIMT for GEMMs)
    report = tensorpress.compile(
        build("mlp"), tmp_path / "mlp.tpk", example_inputs=example_inputs("mlp"), target="cuda:sm_90a"
    )
    library = tmp_path / "library.so"
    library.write_bytes(open_artifact(report.artifact).read_member(LIBRARY))
    fatbin = tmp_path / "kernels.fatbin"
    fatbin.write_bytes(max(extract_fatbins(library), key=len))
    listing = subprocess.run(
        [find_tool("cuobjdump"), "-sass", str(fatbin)], capture_output=True, text=True, check=True
    ).stdout
    gemms = {name: ops for name, ops in parse_sass(listing).items() if "weight_gemm" in name}
    main_kernels = {name: ops for name, ops in gemms.items() if ops["HMMA"]}
    assert len(main_kernels) == 2, sorted(gemms)  # fc1 and fc2
    for name, ops in main_kernels.items():
        assert ops["LDGSTS"] > 0 and ops["LDSM"] > 0, (name, dict(ops))


class _TunedTiles:
    """A ConfigLookup giving one recorded tile config for every Tensor Core kernel (as a tuning log does)."""

    def __init__(self, params):
        self.params = params

    def tuned(self, func, template):
        return (self.params, "tuning_logs/sm_90a/templates.jsonl") if template == "tensorcore-weight-gemm" else None


def test_a_tuned_tile_config_is_used_when_it_validates_else_the_default():
    from tensorpress.schedules.tensorcore.arch import arch_spec
    from tensorpress.schedules.tensorcore.tile_config import choose_config

    func = dense(m=256, k=512, act_dtype="float16").with_attr(N_HINT_ATTR, 16)
    tuned = {"block_n": 16, "block_m": 64, "block_k": 64, "warps": 2, "stages": 3, "split_k": 2}
    config, origin = WeightGemmTensorCore(_TunedTiles(tuned)).chosen_config(func, cuda("sm_90"))
    assert config.to_dict() == tuned and origin == "tuning_logs/sm_90a/templates.jsonl"
    default = choose_config(256, 512, arch_spec("sm_90"), 16)
    for bad, words in [({**tuned, "block_m": 48}, "multiple of 16|split into"), ({**tuned, "bogus": 1}, "bogus")]:
        message = f"tuning_logs/sm_90a/templates.jsonl: tuned tile config not used.*({words})"
        with pytest.warns(UserWarning, match=message):
            config, origin = WeightGemmTensorCore(_TunedTiles(bad)).chosen_config(func, cuda("sm_90"))
        assert (config, origin) == (default, "default")
