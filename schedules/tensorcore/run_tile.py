"""The Tensor Core template's decoded W tile built in runs along K (`decode_stage.py`, "Runs along K").

A plain decode gives each thread one weight per iteration, so work that neighbouring weights share (a
sparse rank: the popcounts of the tile rows above, the row's mask words, the tile offset) is redone for
every weight. A stage with `k_runs` decodes a run of L consecutive weights of one row at once; each
thread takes whole runs, rows innermost so that a warp's 32 threads hold 32 different rows:

    W tile (block_m x block_k, rows padded +16 B)     thread t of the CTA (warps x 32 threads)
        row 0   [ run 0 ........ L ][ run 1 ... ]       t = run_col * block_m + row   (rows fastest)
        row 1   [ t = 1            ][ ...       ]       each run: the stage's bound values (rank once,
        ...                                             then rank += bit a weight), L values, stored as
        row 31  [ t = 31           ][ ...       ]       L / 8 16-byte vectors (STS.128)

    global bits/offsets/values ──run decode (registers)──▶ STS.128 ──▶ W tile ──ldmatrix──▶ B fragments

Bank conflicts: a padded row is block_k + 8 halves, 4 words mod 32, so the 8 threads of a quarter warp
(8 consecutive rows, the unit of a 128-bit store) hit 8 different 4-bank groups: no conflict.

The template splits and binds the W-tile loops (`spread_runs`) and blockizes each run; at the end
`install_k_runs` replaces each run block's body with the stage's run (and, where the K tiles pad K, the
guard col < K: a run starting at or past K stores zeros, a run crossing K masks its columns past K).
"""

from __future__ import annotations

import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir import Range, TensorLoad
from tvm.s_tir.stmt import SBlock
from tvm.tirx import BufferRegion

from tensorpress.schedules.decode_stage import DecodeStage
from tensorpress.schedules.tensorcore.tile_config import WARP_SIZE, TileConfig
from tensorpress.schedules.weight_gemm import weight_gemm_params

VECTOR = 8  # fp16 weights in one 16-byte store


def run_length(stage: DecodeStage, config: TileConfig) -> int | None:
    """The longest run of the stage that fits the config's W tile in whole warps: the runs of a tile are
    a multiple of 32, and either a multiple of the CTA's threads (each thread its share) or a divisor
    of them (the last warps idle while the tile decodes: on m64 k64, runs of 64 for 2 of its 4 warps
    spill nothing, runs of 32 for all 4 spilled 40 B on sm_80)."""
    if stage.k_runs is None:
        return None
    threads = config.warps * WARP_SIZE
    for length in stage.k_runs.lengths:
        runs = config.block_m * config.block_k // length
        if config.block_k % length == 0 and runs % WARP_SIZE == 0 and (runs % threads == 0 or threads % runs == 0):
            return length
    return None


def spread_runs(sch: s_tir.Schedule, loops: list, config: TileConfig, length: int):
    """Split the W tile's (row, col) `loops` into runs of `length` columns, spread the runs over the CTA's
    threads rows fastest (fewer runs than threads: the first warps), and blockize each run: the run
    block (SBlockRV)."""
    rows, cols = loops
    run_col, within = sch.split(cols, [None, length])
    run = sch.blockize(within)  # before the threads: its bindings stay (row, run_col * length + within)
    sch.reorder(run_col, rows)
    _, ty, tx = sch.split(sch.fuse(run_col, rows), [None, config.warps, WARP_SIZE])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    return run


def install_k_runs(
    sch: s_tir.Schedule, run_block, stage: DecodeStage, length: int, k: int, guard: bool
) -> s_tir.Schedule:
    """A new schedule of `sch.mod` in which the blockized run block computes its run with the stage's
    `k_runs` from the stored (global) buffers it reads; `guard`: the K tiles reach past K."""
    old = sch.get(run_block)
    (write,) = old.writes
    rows, cols = write.region
    row, col0 = rows.min, cols.min
    dtype = str(write.source.dtype)
    inner = _inner_block(old)
    func = sch.mod["main"]
    buffers = _global_buffers(func)
    stored = [buffers[str(b.name)] for b in weight_gemm_params(func).stored]
    decoded = [region.source for region in inner.reads if region.source.scope() == "global"]
    bound: list = []  # (local buffer, value): each shared value of the run, computed once, in order

    def bind(name: str, value):
        register = tirx.decl_buffer((1,), str(value.ty), name=f"run_{name}", scope="local")
        bound.append((register, value))
        return register[0]

    values = stage.k_runs.decode(stored, row, col0, length, dtype, bind)
    assert len(values) == length
    zero = tirx.const(0, dtype)
    if guard and k % length:  # the run may cross K: mask its columns past K
        values = [tirx.Select(col0 + i < k, v, zero) for i, v in enumerate(values)]
    # Registers, not let-bindings: TVM 0.27 inlines lets of load-free values, which spelled out every
    # rank as a sum over the run (5140 integer instructions a K tile & warp; nvcc did not recover).
    computed = [tirx.BufferStore(register, value, [0]) for register, value in bound]
    body = tirx.SeqStmt([*computed, _stores(write.source, row, col0, values)])
    if guard:
        body = tirx.IfThenElse(col0 < k, body, _stores(write.source, row, col0, [zero] * length))
    reads = [BufferRegion(b, [Range(0, extent) for extent in b.shape]) for b in decoded]
    registers = [register for register, _ in bound]
    new = SBlock(
        old.iter_vars, reads, old.writes, inner.name_hint, body, alloc_buffers=registers, annotations=old.annotations
    )

    def replace_block(block: SBlock) -> SBlock:
        return new if block.same_as(old) else block

    return s_tir.Schedule(tvm_ffi.structural_map(sch.mod, [(SBlock, replace_block)]))


def _stores(buffer, row, col0, values: list) -> tirx.Stmt:
    """values[i] stored at buffer[row, col0 + i], VECTOR at a time (one 128-bit store each). The fp16
    values travel as uint32 pairs: TVM 0.27 prints an 8-lane fp16 vector built from scalars as
    make_uint4 of 8 halves, which nvcc rejects."""
    dtype = str(buffer.dtype)
    stores = []
    for start in range(0, len(values), VECTOR):
        chunk = values[start : start + VECTOR]
        words = [_pair(chunk[i], chunk[i + 1]) for i in range(0, VECTOR, 2)]
        vector = tirx.Shuffle(words, [tirx.const(i, "int32") for i in range(len(words))])
        value = tirx.reinterpret(f"{dtype}x{VECTOR}", vector)
        stores.append(tirx.BufferStore(buffer, value, [row, tirx.Ramp(col0 + start, 1, VECTOR)]))
    return tirx.SeqStmt(stores)


def _pair(low, high):
    """uint32 holding the 16-bit patterns of `low` (bits 0..15) and `high` (bits 16..31)."""
    bits = [tirx.reinterpret("uint16", h).astype("uint32") for h in (low, high)]
    return bits[0] | (bits[1] << tirx.const(16, "uint32"))


def _inner_block(block: SBlock) -> SBlock:
    found: list = []

    def collect(inner: SBlock) -> SBlock:
        found.append(inner)
        return inner

    tvm_ffi.structural_map(block.body, [(SBlock, collect)])
    (inner,) = found
    return inner


def _global_buffers(func: tirx.PrimFunc) -> dict:
    """name -> Buffer of every global buffer the function loads from (a stored buffer the decode does not
    read, e.g. a row scale, is read by the epilogue)."""
    found: dict = {}

    def visit(load: TensorLoad) -> TensorLoad:
        if load.source.scope() == "global":
            found.setdefault(str(load.source.name), load.source)
        return load

    tvm_ffi.structural_map(func.body, [(TensorLoad, visit)])
    return found
