"""The one-token row-slot GEMM (`row_slot_gemm.py`) written out: X gathered by scalar loads into one vector.

    parallel over blocks b of 8 rows:
      for each token n:
        x_row = &X[n, 0]                            one pointer per token: no per-lane index add
        acc[8] = 0
        for each slot s:
          g = (x_row[column(8b+0, s)], ..., x_row[column(8b+7, s)])   8 scalar column loads + 8 X loads
          acc += g * f32(value(8b + 0..7, s))       one vector of values (vcvtph2ps), one FMA
        Y[n, 8b + r] = epilogue(acc[r] (+ bias)), r with 8b + r < M     (`gemm_epilogue.py`)

Why not the schedule: vectorising the block's 8 rows makes the gather index a vector (one vector load
of 8 columns, then 8 vpextrd to address X: 2 uops each on Zen), and scheduling the gather as an
unrolled scalar stage still leaves LLVM's SLP vectoriser free to rebuild that vector from the
per-lane `n * K + column` adds. Written as one tirx.Shuffle of 8 loads through a per-token row
pointer, LLVM emits what the hardware wants: 8 movzwl, vmovss + 7 vinsertps/vinsertf128, vcvtph2ps,
vfmadd (4096 x 4096 at 80 %, one thread: 1.59 -> 1.1 ms). What bounds it then: loads (17 per
slot; with every column 0 it runs 0.84 ms) and L1 misses on X (a block sweeps all 16 KB of X while
26 KB of slots stream past, so X leaves the 32 KB L1 between blocks: columns confined to 1 KB of X
run 0.84 ms, to 8 KB 0.93, all 16 KB 1.1-1.2). Not the FMA latency (2 and 4 accumulators measured
the same), not the stream (prefetchnta 16-64 slots ahead measured the same), and reading the 8
columns as two 64-bit words (2 loads + shifts) gained under 3 %.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir.stmt import SBlock, SBlockRealize
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from tensorpress.schedules.decode_stage import RowSlots
from tensorpress.schedules.gemm_epilogue import epilogue_of
from tensorpress.schedules.weight_gemm import weight_gemm_params

LANES = 8


def gather_row_slot_func(func: tirx.PrimFunc, slots: RowSlots, m: int) -> tirx.PrimFunc:
    """The weight GEMM `func` (made over `slots`, block_rows == LANES) rewritten as the module
    docstring's loops, same arguments and attributes."""
    return func.with_body(gather_statement(func, slots, m))


def with_one_token_gather(func: tirx.PrimFunc, slots: RowSlots, m: int) -> tirx.PrimFunc:
    """The scheduled row-slot GEMM `func` (N symbolic), running the module docstring's loops instead
    when a call has one token: a decode step is built for 16 tokens (8 token lanes) but often sees one
    sequence, where the lanes would multiply 7 zero tokens (2.4 vs 1.1 ms at 4096 x 4096, 80 %)."""
    root = func.body.block
    one_token = func.params[0].shape[0] == 1
    body = tirx.IfThenElse(one_token, gather_statement(func, slots, m), root.body)
    block = SBlock(
        root.iter_vars, root.reads, root.writes, root.name_hint, body, root.init,
        root.alloc_buffers, root.match_buffers, root.annotations,
    )  # fmt: skip
    return func.with_body(SBlockRealize(func.body.iter_values, func.body.predicate, block))


def gather_statement(func: tirx.PrimFunc, slots: RowSlots, m: int) -> tirx.Stmt:
    """The module docstring's loops over the arguments of the weight GEMM `func`."""
    assert slots.block_rows == LANES
    params = weight_gemm_params(func)
    epilogue = epilogue_of(func)
    x, y, bias, residual, stored = params.x, params.y, params.bias, params.residual, params.stored
    num_slots = int(stored[0].shape[1])
    blocks = int(stored[0].shape[0])
    k = int(x.shape[1])
    with IRBuilder() as ib, T.parallel(0, blocks) as b, T.serial(0, x.shape[0]) as n:
        row_ptr = T.bind(T.address_of(x[n, 0]))
        x_row = T.decl_buffer((k,), x.dtype, data=row_ptr)
        # "global" (not "local"): a small constant allocation on the stack, which LLVM
        # keeps in a register; "local" would be a TVMBackendAllocWorkspace call.
        acc = T.decl_buffer((LANES,), "float32", scope="global")
        lanes = tirx.Ramp(tirx.const(0, "int32"), 1, LANES)
        T.buffer_store(acc, tirx.Broadcast(tirx.const(0, "float32"), LANES), [lanes])
        gathered = T.decl_buffer((LANES,), "float32", scope="global")
        with T.serial(0, num_slots) as s:
            loads = [x_row[slots.column(stored, b * LANES + r, s)].astype("float32") for r in range(LANES)]
            T.buffer_store(gathered, tirx.Shuffle(loads, list(range(LANES))), [lanes])
            with T.vectorized(0, LANES) as r:
                value = slots.value(stored, b * LANES + r, s).astype("float32")
                T.buffer_store(acc, acc[r] + gathered[r] * value, [r])
        with T.vectorized(0, LANES) as r, T.If(b * LANES + r < m), T.Then():
            out = acc[r] + bias[b * LANES + r].astype("float32") if bias is not None else acc[r]
            out = epilogue.apply(out, residual[n, b * LANES + r] if residual is not None else None)
            T.buffer_store(y, out.astype(y.dtype), [n, b * LANES + r])
    return ib.get()
