"""When TVM fails inside a compile: find the kernel it failed on and say so in one sentence.

An unexpected error from TVM (an internal check, a schedule TVM's lowering rejects) is a bug in
tensorpress, not the user's fault, but the user still gets one sentence naming what failed: the stage,
the kernel (a fused PrimFunc is named for its ops, e.g. `fused_matmul_add`) with its buffer shapes, and
the target. Finding the kernel re-runs the work per function, so it happens only on this failure path.
The original traceback stays chained to the error (`--verbose` / TENSORPRESS_DEBUG=1 prints it).
"""

from __future__ import annotations

from typing import Any

from tensorpress.compiler.targets import TargetSpec
from tensorpress.errors import InternalCompileError


def internal_compile_error(stage: str, target: TargetSpec, err: BaseException, mod: Any = None) -> InternalCompileError:
    """One-sentence error for `err`, raised by TVM during `stage` ("rewrite", "build", ...) of a compile
    for `target`; with the Relax module `mod` the failing kernel is looked for and named."""
    where = ""
    if mod is not None:
        try:
            where = _failing_kernel(mod, target)
        except Exception:  # noqa: BLE001 - the diagnosis must never hide the original error
            where = ""
    detail = (str(err).strip().splitlines() or [type(err).__name__])[-1].strip()
    return InternalCompileError(
        f"tensorpress failed in its {stage} stage{where} for target {target.name} "
        f"({type(err).__name__}: {detail[:300]}); "
        "this is a tensorpress bug: nothing was written, rerun with --verbose (or TENSORPRESS_DEBUG=1) for "
        "the traceback and report it."
    )


def _failing_kernel(mod: Any, target: TargetSpec) -> str:
    """' on kernel NAME (x: float32[1, 10], ...)' for the first PrimFunc whose scheduling or build fails,
    or '' when each builds alone."""
    import tvm
    from tvm import tirx

    from tensorpress.compiler.build import relax_lowering, rule_target_for, tir_pipeline
    from tensorpress.schedules.rules import rules_for

    tvm_target = target.tvm_target()
    with tvm_target:
        lowered = tvm.transform.Sequential(relax_lowering())(mod)
    rule_target = rule_target_for(target, tvm_target)
    rules = rules_for(tvm_target)
    for gvar, func in lowered.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        try:
            with rule_target:
                scheduled = next((s for r in rules if (s := r.apply(func, rule_target, False)) is not None), None)
            one = scheduled.mod["main"] if scheduled is not None else func
            module = tvm.IRModule({"main": one.with_attr("global_symbol", "main")})
            tvm.compile(module, target=tvm_target, tir_pipeline=tir_pipeline())
        except Exception:  # noqa: BLE001 - this is the kernel that fails
            return f" on kernel {gvar.name_hint} ({kernel_signature(func)})"
    return ""


def kernel_signature(func: Any) -> str:
    """'x: float32[1, 10], y: float32[1, 10]' for a PrimFunc's buffer parameters."""
    from tvm import tirx

    parts = []
    for param in func.params:
        ty = param.ty  # TVM 0.27: a buffer parameter is a Var whose type is the BufferType
        if hasattr(ty, "shape") and hasattr(ty, "dtype"):
            dims = ", ".join(str(int(d)) if isinstance(d, tirx.IntImm) else str(d) for d in ty.shape)
            parts.append(f"{param.name}: {ty.dtype}[{dims}]")
    return ", ".join(parts)
