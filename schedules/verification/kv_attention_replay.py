"""Replay the CUDA schedule of the paged KV kernels on the CPU (the project's replay, `verification/cpu_replay.py`,
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

import tvm
import tvm_ffi
from tvm import tirx
from tvm.s_tir import stmt as sblock_stmt

from tensorpress.schedules.verification.cpu_replay import REPLAY_PIPELINE, serialize_threads


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


def build_replay(mod: tvm.IRModule, seed: int | None = 0) -> tvm.runtime.Executable:
    """Build a CUDA-scheduled module for llvm: threads serialized (shuffled by `seed`), scratch poisoned."""
    serial = serialize_threads(mod, seed, keep_order=reduction_thread_vars(mod))
    return tvm.compile(serial, target=tvm.target.Target("llvm"), tir_pipeline=REPLAY_PIPELINE)
