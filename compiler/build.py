"""Relax module (weights as parameters), after the graph passes -> one compiled library for a target.

The build only lowers: TVM's own Relax lowering (legalize, with our NaN-keeping legalisations, fuse,
lower to the VM), then the schedule rules that turn each TIR function into a kernel
(`schedules/rules.py`: the weight-GEMM template for compressed and dense linear layers, our CPU
schedules, dlight for the rest on CUDA), then TVM's TIR lowering followed by PropagateNaN, which makes
every float min/max return NaN where an operand is NaN (ReLU, clip, max reductions, the fast-math
clamps), on every target, and RunSmallParallelLoopsSerially, which runs a parallel loop nest with little
work on the calling thread (no thread-pool wake-up). Every graph pass (ours and the TVM ones we choose)
runs before, in `compiler/pipeline.py`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tensorpress.compiler.targets import TargetSpec
from tensorpress.errors import TensorpressError


@dataclass
class BuildResult:
    library: Path
    seconds: float
    kernels: list[str]  # names of the TIR kernels in the library
    # template kernels: name -> {"template", "config", "origin"} (the tile config and its tuning log or "default")
    kernel_configs: dict[str, dict] = field(default_factory=dict)
    tuned_kernels: list[str] = field(default_factory=list)  # generic ops scheduled from the tuning log


TIR_PIPELINE = "tensorpress_nan_propagating"


def tir_pipeline() -> str:
    """The name of the TIR pipeline every build uses (registered with TVM on first call): TVM's own
    lowering (the s_tir pipeline), then PropagateNaN on every lowered kernel, so float min/max return
    NaN when an operand is NaN, as onnxruntime and torch do (compiler/passes/propagate_nan.py), then
    RunSmallParallelLoopsSerially, so a small parallel loop nest does not wake the CPU thread pool."""
    from tvm.tirx.compilation_pipeline import register_tir_pipeline

    register_tir_pipeline(TIR_PIPELINE, _nan_propagating_tir_pipeline)
    return TIR_PIPELINE


def _nan_propagating_tir_pipeline():
    import tvm
    from tvm.tirx.compilation_pipeline import get_tir_pipeline

    from tensorpress.compiler.passes.propagate_nan import propagate_nan
    from tensorpress.compiler.passes.run_small_parallel_loops_serially import run_small_parallel_loops_serially

    lower, finalize_host, finalize_device = get_tir_pipeline("s_tir")
    passes = [lower, propagate_nan, run_small_parallel_loops_serially]
    return tvm.transform.Sequential(passes), finalize_host, finalize_device


def relax_lowering() -> list:
    """The Relax passes that turn the graph into fused TIR kernels, before any schedule rule runs (the
    build's pipeline and the failure diagnosis in build_failure.py lower alike)."""
    from tvm import relax

    from tensorpress.compiler.passes.legalize_sign_keeping_nan import LEGALIZE_KEEPING_NAN

    return [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(LEGALIZE_KEEPING_NAN),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def rule_target_for(target_spec: TargetSpec, tvm_target):
    """The target the schedule rules see. dlight reads the arch with a parser that cannot read "sm_90a"
    and silently drops Tensor Cores; it schedules against sm_90, the kernels are still built for sm_90a
    (field guide, fact 4)."""
    import tvm

    if target_spec.kind == "cuda" and target_spec.arch == "sm_90a":
        return tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host=tvm_target.host)
    return tvm_target


def _relax_pipeline(
    target_spec: TargetSpec, tvm_target, configs=None, kernel_configs: dict | None = None, tuning_logs=(), tuned=None
):
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    from tensorpress.compiler.passes.order_shape_heap_stores import order_shape_heap_stores
    from tensorpress.schedules.rules import rules_for
    from tensorpress.schedules.template_config import stamp_of

    rule_target = rule_target_for(target_spec, tvm_target)
    order_shape_heap_stores_pass = tvm.transform.module_pass(
        lambda mod, _ctx: order_shape_heap_stores(mod), opt_level=0, name="OrderShapeHeapStores"
    )

    @tvm.transform.module_pass(opt_level=0, name="TensorpressRelaxPipeline")
    def pipeline(mod, _ctx):
        with tvm_target:
            mod = tvm.transform.Sequential(relax_lowering())(mod)
        for tuning_log in tuning_logs:  # generic ops with a meta_schedule record; the rules skip them
            from tensorpress.compiler.tuning.generic_records import apply_generic_records

            mod, names = apply_generic_records(mod, tvm_target, tuning_log)
            if tuned is not None:
                tuned.extend(names)
        with rule_target:
            mod = dl.ApplyDefaultSchedule(*rules_for(tvm_target, configs))(mod)
        if kernel_configs is not None:  # what each template kernel was scheduled with (template_config.py)
            for gvar, func in mod.functions_items():
                stamp = stamp_of(func) if isinstance(func, tvm.tirx.PrimFunc) else None
                if stamp is not None:
                    kernel_configs[gvar.name_hint] = stamp
        finalize = [
            relax.transform.RewriteDataflowReshape(),
            relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(),
            relax.transform.CallTIRRewrite(),
            relax.transform.StaticPlanBlockMemory(),
            relax.transform.LowerAllocTensor(),
            relax.transform.KillAfterLastUse(),
            relax.transform.LowerRuntimeBuiltin(),
            relax.transform.ComputePrimValue(),
            relax.transform.VMShapeLower(),
            order_shape_heap_stores_pass,  # TVM emits the shape functions' stores in hash order
            relax.transform.AttachGlobalSymbol(),
        ]
        with tvm_target:
            return tvm.transform.Sequential(finalize)(mod)

    return pipeline


def build_library(mod, target_spec: TargetSpec, out_path: Path, configs=None, tuning_logs=()) -> BuildResult:
    """Compile `mod` for `target_spec` and export the library to `out_path` (a shared object).
    `configs`: a `ConfigLookup` of tuned template configs (schedules/template_config.py), None for none.

    CUDA libraries carry real fatbins built by nvcc (a source-only CUDA module is refused). tuning_logs:
    tuning log folders, first first, whose meta_schedule records schedule the generic ops they match.
    """
    if target_spec.kind == "cuda":
        from tensorpress.compiler.cuda.toolchain import ensure_cuda_build_support, library_has_gpu_binary

        ensure_cuda_build_support()
    import tvm

    start = time.perf_counter()
    kernel_configs: dict[str, dict] = {}
    tuned: list[str] = []
    tvm_target = target_spec.tvm_target()
    config = {"tirx.use_async_copy": True} if target_spec.kind == "cuda" else {}
    with tvm_target, tvm.transform.PassContext(opt_level=3, config=config):
        executable = tvm.compile(
            mod,
            target=tvm_target,
            relax_pipeline=_relax_pipeline(target_spec, tvm_target, configs, kernel_configs, tuning_logs, tuned),
            tir_pipeline=tir_pipeline(),
        )
    executable.export_library(str(out_path))
    seconds = time.perf_counter() - start
    if target_spec.kind == "cuda" and not library_has_gpu_binary(out_path):
        raise TensorpressError(
            f"the CUDA build for {target_spec.arch} produced no GPU binary (only CUDA source); check that "
            "nvcc works (TVM_CUDA_COMPILE_MODE=nvcc) and that no other process loaded TVM without the CUDA "
            "runtime."
        )
    kernels = sorted(gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    return BuildResult(Path(out_path), seconds, kernels, dict(sorted(kernel_configs.items())), sorted(tuned))


def compiler_versions() -> dict[str, str]:
    import tvm
    import tvm_ffi

    from tensorpress import __version__

    return {"tensorpress": __version__, "tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__}


def cpu_count() -> int:
    return os.cpu_count() or 1
