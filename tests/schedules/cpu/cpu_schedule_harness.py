"""Shared by the CPU schedule tests: build small Relax graphs the way the pipeline lowers them, apply one
rule, compile for llvm and run on numpy arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tvm
from tvm import relax, s_tir, tirx

AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2})
AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})


def host_has(flag: str) -> bool:
    """Whether this machine's CPU has `flag` (as /proc/cpuinfo names it): can it run that target?"""
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and f" {flag}" in cpuinfo.read_text()


def legalized_prim_funcs(mod: tvm.IRModule) -> dict[str, tirx.PrimFunc]:
    """The TIR functions the pipeline hands to the schedule rules: legalised and fused."""
    lowering = tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
    )
    lowered = lowering(mod)
    return {gv.name_hint: f for gv, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc)}


def only_prim_func(mod: tvm.IRModule, contains: str = "") -> tirx.PrimFunc:
    """The single legalised function whose name contains `contains`."""
    funcs = [f for name, f in legalized_prim_funcs(mod).items() if contains in name]
    assert len(funcs) == 1, f"expected one function matching {contains!r}, got {len(funcs)}"
    return funcs[0]


def schedule(rule, func: tirx.PrimFunc, target=AVX2) -> s_tir.Schedule:
    """Apply `rule`; fail the test if the rule does not take the function."""
    sch = rule.apply(func, target, False)
    assert sch is not None, f"{type(rule).__name__} did not take the function"
    return sch


def run(sch_or_func, inputs: list[np.ndarray], outputs: list[tuple[tuple[int, ...], str]], target=AVX2):
    """Compile the scheduled function for `target`, call it on `inputs`, return the output arrays."""
    func = sch_or_func.mod["main"] if isinstance(sch_or_func, s_tir.Schedule) else sch_or_func
    func = func.with_attr("global_symbol", "main")
    executable = tvm.compile(tvm.IRModule({"main": func}), target=target)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs]
    outs = [tvm.runtime.empty(shape, dtype, dev) for shape, dtype in outputs]
    executable["main"](*args, *outs)
    return [o.numpy() for o in outs]


def compiled(sch_or_func, target=AVX2):
    """The compiled function, to call several times with different (symbolic) shapes."""
    func = sch_or_func.mod["main"] if isinstance(sch_or_func, s_tir.Schedule) else sch_or_func
    executable = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    dev = tvm.cpu()

    def call(inputs: list[np.ndarray], outputs: list[tuple[tuple[int, ...], str]]) -> list[np.ndarray]:
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs]
        outs = [tvm.runtime.empty(shape, dtype, dev) for shape, dtype in outputs]
        executable["main"](*args, *outs)
        return [o.numpy() for o in outs]

    return call


def relax_graph(params: list[tuple[str, list, str]], body) -> tvm.IRModule:
    """A one-function Relax module: `params` are (name, shape, dtype) (shapes may hold tirx.Vars),
    `body(bb, *vars)` emits the computation and returns the output expression."""
    bb = relax.BlockBuilder()
    variables = [relax.Var(name, relax.TensorType(shape, dtype)) for name, shape, dtype in params]
    with bb.function("main", variables):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *variables))
        bb.emit_func_output(out)
    return bb.get()


def sym(name: str) -> tirx.Var:
    """A symbolic (int64) dimension."""
    return tirx.Var(name, "int64")


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)
