"""The distinct template kernels of a model, as `compile` would build them, without building.

    rewritten = rewrite_for_target(imported, ...)       compile's plan and graph passes
    lowered   = relax_lowering()(rewritten.mod)          compile's Relax lowering (legalise, fuse)
    kernels   = weight-GEMM PrimFuncs, one per record key (layers of one shape and format share it)

Kernels the search cannot time on random inputs are left out: those of formats whose stored buffers
depend on the weight's data (sparse formats: they hold indices, and random ones would read far outside
their arrays).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from tensorpress.compiler.targets import TargetSpec
from tensorpress.compiler.tuning.records import kernel_key, key_text
from tensorpress.compiler.tuning.template_search import TemplateKernel

# The token count a kernel is timed at when its PrimFunc has no n_hint (symbolic N, no hint).
DEFAULT_TOKENS = 16


def lowered_module(mod: Any, target: TargetSpec) -> Any:
    """`mod` after the build's Relax lowering (fused TIR kernels, nothing scheduled)."""
    import tvm

    from tensorpress.compiler.build import relax_lowering

    with target.tvm_target(), tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(relax_lowering())(mod)


def template_kernels(
    mod: Any, target: TargetSpec, template: str, data_dependent: Collection[str] = ()
) -> list[TemplateKernel]:
    """The distinct, timeable weight-GEMM kernels of a lowered module, in a stable order; formats named in
    `data_dependent` are kept although their buffers depend on the data (the GPU kit makes such weights)."""
    import tvm

    from tensorpress.schedules.template_config import kernel_signature
    from tensorpress.schedules.weight_gemm import FORMAT_ATTR, is_weight_gemm

    found: dict[str, TemplateKernel] = {}
    for gvar, func in sorted(mod.functions_items(), key=lambda item: item[0].name_hint):
        if not isinstance(func, tvm.tirx.PrimFunc) or not is_weight_gemm(func):
            continue
        if str(func.attrs[FORMAT_ATTR]) not in data_dependent and not _data_independent(func):
            continue
        key = kernel_key(kernel_signature(func), template, target)
        found.setdefault(key_text(key), TemplateKernel(gvar.name_hint, func, key, key["n"] or DEFAULT_TOKENS))
    return list(found.values())


def _data_independent(func: Any) -> bool:
    """Whether the kernel's format stores buffers that follow from the shape alone (no indices)."""
    from tensorpress.schedules.weight_gemm import decode_stage_of

    m, k = (int(v) for v in func.attrs["tensorpress.mk"])
    try:
        decode_stage_of(func).stored_buffers(m, k)
    except (NotImplementedError, KeyError):
        return False
    return True
