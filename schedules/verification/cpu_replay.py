"""Replay a Tensor Core schedule on the CPU: thread loops made serial, scratch memory poisoned.

The template is scheduled with the emulated intrinsic set (`emulation.py`), so ldmatrix and mma run
as plain loops fed the same address expressions as on the GPU. Then:

* every thread-bound loop (blockIdx.*, threadIdx.*) becomes a serial loop that visits its indices in
  a shuffled order (an affine permutation i -> (a·i + b) mod extent, or reversed for symbolic
  extents), so a result that depends on which thread runs first differs between seeds. The loops
  stay in natural order until TVM has compacted the buffers and lowered the blocks (the order rides
  on the loop as an annotation; `shuffle_threads` applies it): TVM 0.27's CompactBufferAllocation
  narrows a buffer's region by the predicates of the blocks that access it, and with a permuted
  thread index in a predicate it can leave another loop's variable in the compacted buffer's offset
  (the FPx e3m3 plane1 copy at 16x32x64: "variable ax0_ax1_fused_1 has been used before
  definition" for 7 seeds in 100). The shuffle only reorders serial loops, so it may come late;
* every shared-memory and warp/local buffer is filled with NaN (integers: all ones) right where it is
  allocated, so reading an element nobody wrote poisons the output instead of passing by luck;
* the module is lowered by TVM's own s_tir pipeline minus the GPU-only passes (barriers, cp.async
  injection, warp-memory lowering) and built for llvm.

What the replay cannot see: races and missing barriers (serial execution has none), GPU-only passes
and CUDA codegen, resource limits. nvcc/ptxas (`inspection.py`) and the GPU tests cover those.

Serial loops also change one thing about the program: a cooperative copy nested in a warp loop runs
once per warp instead of once per CTA, which is harmless for copies and decodes (they are idempotent)
but would hide cooperative accumulation in shared memory; the template has none.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.tirx.compilation_pipeline import register_tir_pipeline

REPLAY_PIPELINE = "tensorpress_replay"
SCRATCH_SCOPES = ("shared", "shared.dyn", "warp", "local")
THREAD_ANNOTATION = "tensorpress.replay_thread"
ORDER_ANNOTATION = "tensorpress.replay_order"  # a serialized thread loop's shuffled order (shuffle_threads)
CUDA_LOOP_PRAGMAS = ("pragma_unroll", "disable_unroll")  # nvcc's business


def serialize_threads(mod: tvm.IRModule, seed: int | None = None, keep_order: Sequence[tirx.Var] = ()) -> tvm.IRModule:
    """Turn thread-bound loops into serial loops, to be visited in a shuffled order unless `seed` is None.

    Each loop keeps its thread tag as the annotation `tensorpress.replay_thread`, and its shuffled
    order as `tensorpress.replay_order` (see `shuffle_threads`, which the replay pipeline runs once the
    buffers are compacted; until then the loop runs in natural order). Loops over the variables in
    `keep_order` keep their natural order (the KV replay's warp-reduction lanes, see
    `kv_attention_replay.py`). Unrolled loops become plain serial loops too (same semantics, far
    shorter llvm builds), and nvcc's loop pragmas are dropped (llvm would warn about them).
    """
    rng = random.Random(seed)

    def order(extent: tirx.PrimExpr, old: tirx.Var) -> list[int] | None:
        """[stride, offset] of trip i -> (stride·i + offset) mod extent; [] reversed; None natural."""
        if seed is None or any(old.same_as(v) for v in keep_order):
            return None
        if isinstance(extent, tirx.IntImm):
            n = int(extent)
            if n <= 1:
                return None
            stride = rng.choice([a for a in range(1, n) if math.gcd(a, n) == 1] or [1])
            return [stride, rng.randrange(n)]
        return []

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
        annotations = dict(loop.annotations)
        annotations[THREAD_ANNOTATION] = loop.thread_binding.thread_tag
        shuffled = order(loop.extent, loop.loop_var)
        if shuffled is not None:
            annotations[ORDER_ANNOTATION] = shuffled
        return tirx.For(
            loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body, None, annotations, loop.step,
            loop.span,
        )  # fmt: skip

    return tvm_ffi.structural_map(mod, (tirx.For, serialize))


@tirx.transform.prim_func_pass(opt_level=0, name="tensorpress.ShuffleThreads")
def shuffle_threads(func: tirx.PrimFunc, _mod, _ctx) -> tirx.PrimFunc:
    """Make each serial loop carrying a `tensorpress.replay_order` (`serialize_threads`) visit its
    threads in that order: trip i runs thread min + (stride·i + offset) mod extent, or the threads
    from last to first."""

    def shuffle(loop: tirx.For) -> tirx.For:
        order = loop.annotations.get(ORDER_ANNOTATION)
        if order is None:
            return loop
        old = loop.loop_var
        index = tirx.Var(old.name, old.ty)
        trip = index - loop.min
        if len(order) == 2:
            thread = tirx.floormod(trip * int(order[0]) + int(order[1]), loop.extent)
        else:
            thread = loop.extent - 1 - trip
        thread = thread + loop.min
        body = tvm_ffi.structural_map(loop.body, (tirx.Var, lambda v: thread if v.same_as(old) else v))
        annotations = {k: v for k, v in loop.annotations.items() if k != ORDER_ANNOTATION}
        return tirx.For(index, loop.min, loop.extent, loop.kind, body, None, annotations, loop.step, loop.span)

    return tvm_ffi.structural_map(func, (tirx.For, shuffle))


def _poison_value(dtype: str) -> tirx.PrimExpr:
    if dtype.startswith(("float", "bfloat")):
        return tirx.const(float("nan"), dtype)
    if dtype.startswith("uint"):
        return tirx.const((1 << int(dtype[4:])) - 1, dtype)
    return tirx.const(-1, dtype)


def _poison_fill(buffer: tirx.Buffer) -> tirx.Stmt:
    """for i in range(size): buffer[i] = poison   (buffers are flat when this runs)"""
    index = tirx.Var("poison_i", "int32")
    size = 1
    for extent in buffer.shape:
        size = size * extent
    store = tirx.BufferStore(buffer, _poison_value(str(buffer.dtype)), [index])
    return tirx.For(index, 0, size, tirx.ForKind.SERIAL, store)


@tirx.transform.prim_func_pass(opt_level=0, name="tensorpress.PoisonScratchBuffers")
def poison_scratch_buffers(func: tirx.PrimFunc, _mod, _ctx) -> tirx.PrimFunc:
    """After every allocation of a shared/warp/local buffer, fill it with NaN (or all-ones bits)."""

    def poison(seq: tirx.SeqStmt) -> tirx.SeqStmt:
        stmts = []
        changed = False
        for stmt in seq.seq:
            stmts.append(stmt)
            if isinstance(stmt, tirx.AllocBuffer) and stmt.buffer.scope() in SCRATCH_SCOPES:
                stmts.append(_poison_fill(stmt.buffer))
                changed = True
        return tirx.SeqStmt(stmts) if changed else seq

    return tvm_ffi.structural_map(func, (tirx.SeqStmt, poison))


def _replay_pipeline():
    """TVM 0.27's s_tir pipeline (tvm/s_tir/pipeline.py) for a CPU replay: the same lowering of
    blocks, layouts, permuted layouts and software pipelines, with the poisoning inserted once buffers
    are flat, and without the passes that only exist for real GPU threads."""

    @tvm.transform.module_pass(opt_level=0, name="tensorpress.ReplayPipeline")
    def pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        passes = [
            s_tir.transform.CanonicalizeLoop(),
            s_tir.transform.LowerCrossThreadReduction(),
            s_tir.transform.LowerInitBlock(),
            s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
            s_tir.transform.ConvertBlocksToOpaque(),
            s_tir.transform.LiftThreadBinding(),
            s_tir.transform.ManifestSharedMemoryLocalStage(),
            s_tir.transform.CompactBufferAllocation(),
            s_tir.transform.LowerAutoCopy(),
            s_tir.transform.UnifyThreadBinding(),
            s_tir.transform.LowerMatchBuffer(),
            s_tir.transform.StmtSimplify(),
            s_tir.transform.InjectPermutedLayout(),
            s_tir.transform.AnnotateIrregularLoop(),
            s_tir.transform.InjectSoftwarePipeline(),
            s_tir.transform.TransformMmaBufferLayout(),
            s_tir.transform.LowerOpaqueBlock(),
            shuffle_threads,  # after the last pass that reads block predicates (module docstring)
            tirx.transform.FlattenBuffer(),
            poison_scratch_buffers,
            tirx.transform.BF16ComputeLegalize(),
            tirx.transform.NarrowDataType(32),
            s_tir.transform.LoopPartition(),
            tirx.transform.VectorizeLoop(True),
            s_tir.transform.InjectVirtualThread(),
            s_tir.transform.InjectDoubleBuffer(),
            tirx.transform.StorageRewrite(),
            s_tir.transform.HoistIfThenElse(),
            tirx.transform.UnrollLoop(),
            s_tir.transform.RenormalizeSplitPattern(),
            tirx.transform.StmtSimplify(),
            tirx.transform.RemoveNoOp(),
            s_tir.transform.RewriteUnsafeSelect(),
            tirx.transform.CommonSubexprElim(),
            tirx.transform.FP8ComputeLegalize(),
            tirx.transform.VerifyMemory(),
            tirx.transform.AnnotateEntryFunc(),
            tirx.transform.SplitHostDevice(),
            tirx.transform.MakePackedAPI(),
            tirx.transform.FP8StorageLegalize(),
            tirx.transform.BF16StorageLegalize(),
        ]
        return tvm.transform.Sequential(passes)(mod)

    def finalize_host():
        return tvm.transform.Sequential([tirx.transform.LowerTVMBuiltin(), tirx.transform.LowerIntrin()])

    def finalize_device():
        return tvm.transform.Sequential([tirx.transform.LowerIntrin()])

    return pipeline, finalize_host, finalize_device


register_tir_pipeline(REPLAY_PIPELINE, _replay_pipeline)


def build_replay(mod: tvm.IRModule, seed: int | None = 0) -> tvm.runtime.Executable:
    """Build a module scheduled with the emulated intrinsics for the CPU (llvm), threads serialized
    in the order `seed` picks (None: natural order) and scratch buffers poisoned."""
    serial = serialize_threads(mod, seed)
    return tvm.compile(serial, target=tvm.target.Target("llvm"), tir_pipeline=REPLAY_PIPELINE)
