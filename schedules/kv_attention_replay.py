"""Replay the CUDA schedule of the paged KV kernels on the CPU (the project's replay, `tensorcore/replay.py`,
adapted to kernels with cross-thread reductions).

The same machinery as the Tensor Core replay: thread-bound loops become serial loops visiting their
indices in a shuffled order, shared/local buffers are filled with NaN where they are allocated, and
the module is lowered without the GPU-only passes and built for llvm. One difference: a thread loop
that feeds a *reduction* variable of a block (the lanes of a warp-shuffle sum) keeps its natural
order. Its block's `init` runs where the reduction variables are 0, which on the GPU is each thread's
own in-thread start (the cross-thread part is lowered separately); serialised, the init must come on
the first iteration or it would wipe the partial sum. Shuffling those loops tests nothing the GPU
does; every other thread loop (spatial work, cooperative copies) is shuffled.

What it cannot see, as for the GEMM template: races and missing barriers, the lowering of the
cross-thread reductions to shuffles, and resource limits (`inspection.py` and the GPU tests do).
"""

from __future__ import annotations

import math
import random

import tvm
import tvm_ffi
from tvm import tirx
from tvm.s_tir import stmt as sblock_stmt

from tensorpress.schedules.tensorcore.replay import REPLAY_PIPELINE, THREAD_ANNOTATION

CUDA_LOOP_PRAGMAS = ("pragma_unroll", "disable_unroll")  # nvcc's business; llvm would warn about them


def reduction_thread_vars(mod: tvm.IRModule) -> list[tirx.Var]:
    """Loop variables that appear in the binding of some block's reduction variable."""
    found: list[tirx.Var] = []

    def collect(var: tirx.Var) -> tirx.Var:
        found.append(var)
        return var

    def visit(realize):
        for iter_var, value in zip(realize.block.iter_vars, realize.iter_values):
            if iter_var.iter_type == tirx.IterVar.CommReduce:
                tvm_ffi.structural_map(value, (tirx.Var, collect))
        return realize

    for _, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            tvm_ffi.structural_map(func.body, (sblock_stmt.SBlockRealize, visit))
    return found


def serialize_threads(mod: tvm.IRModule, seed: int | None = 0) -> tvm.IRModule:
    """Thread-bound loops -> serial loops in a seed-shuffled order (natural order for seed None and for
    loops that feed a reduction variable). Unrolled loops become serial too (faster llvm builds)."""
    rng = random.Random(seed)
    keep_order = reduction_thread_vars(mod)

    def order(index: tirx.Var, extent: tirx.PrimExpr, old: tirx.Var) -> tirx.PrimExpr:
        if seed is None or any(old.same_as(v) for v in keep_order):
            return index
        if isinstance(extent, tirx.IntImm):
            n = int(extent)
            if n <= 1:
                return index
            stride = rng.choice([a for a in range(1, n) if math.gcd(a, n) == 1] or [1])
            return tirx.floormod(index * stride + rng.randrange(n), n)
        return extent - 1 - index

    def serialize(loop: tirx.For) -> tirx.For:
        if loop.kind == tirx.ForKind.UNROLLED or any(k in loop.annotations for k in CUDA_LOOP_PRAGMAS):
            annotations = {k: v for k, v in loop.annotations.items() if k not in CUDA_LOOP_PRAGMAS}
            kind = tirx.ForKind.SERIAL if loop.kind == tirx.ForKind.UNROLLED else loop.kind
            loop = tirx.For(
                loop.loop_var, loop.min, loop.extent, kind, loop.body, loop.thread_binding, annotations,
                loop.step, loop.span,
            )  # fmt: skip
        if loop.kind != tirx.ForKind.THREAD_BINDING:
            return loop
        old = loop.loop_var
        index = tirx.Var(old.name, old.ty)
        visit = order(index, loop.extent, old)
        body = tvm_ffi.structural_map(loop.body, (tirx.Var, lambda v: visit if v.same_as(old) else v))
        annotations = dict(loop.annotations)
        annotations[THREAD_ANNOTATION] = loop.thread_binding.thread_tag
        return tirx.For(
            index, loop.min, loop.extent, tirx.ForKind.SERIAL, body, None, annotations, loop.step, loop.span
        )

    return tvm_ffi.structural_map(mod, (tirx.For, serialize))


def build_replay(mod: tvm.IRModule, seed: int | None = 0) -> tvm.runtime.Executable:
    """Build a CUDA-scheduled module for llvm: threads serialized (shuffled by `seed`), scratch poisoned."""
    return tvm.compile(serialize_threads(mod, seed), target=tvm.target.Target("llvm"), tir_pipeline=REPLAY_PIPELINE)
