"""The Tensor Core template's W tile for a tile-scatter stage (`decode_stage.py`, "Tile scatter").

    global ──LDG.128 (4 words a thread)──▶ registers ──STS (value at its (row, col))──▶ W tile ──ldmatrix──▶ B
                       after the CTA zero-filled the W tile (STS.128) and waited at a barrier

The template schedules W like a decoded tile (a cache_read of the PrimFunc's W computed at each K tile,
rows padded by 16 B so ldmatrix reads are free of bank conflicts) and blockizes one K tile's copy; this
module replaces that block's body with `schedules/tile_scatter.py`'s zero-fill and scatter over the
block's write region, spread over the CTA's threads (threadIdx.y = warps, threadIdx.x = lanes). The block
keeps its iterators and write region and reads the stage's stored words and offsets, so the software
pipeline and buffer compaction see what it really touches. The PrimFunc's own "decode" block (the
whole-W scatter, `make_weight_gemm`) is then read by nobody and is removed with its buffer.
"""

from __future__ import annotations

import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir import Range
from tvm.s_tir.stmt import SBlock, SBlockRealize
from tvm.tirx import BufferRegion

from tensorpress.schedules.tensorcore.tile_config import WARP_SIZE, TileConfig
from tensorpress.schedules.tile_scatter import ScatterRegion, ScatterThreads, cuda_threads, scatter_statement
from tensorpress.schedules.weight_gemm import decode_stage_of, weight_gemm_params


def without_scatter_decode(func: tirx.PrimFunc) -> tuple[tirx.PrimFunc, list[tirx.Buffer]]:
    """(`func` without its "decode" block and the loops around it, the stored buffers in order). The W
    buffer it wrote stays allocated and unwritten until `install_tile_scatter` drops it: the schedule
    reads it like an input. The block is the whole-W scatter of a pure scatter stage, or the per-element
    decode of a stage that offers both (`decode_stage.py`, "Tile scatter")."""
    found: list = []

    def drop(realize: SBlockRealize):
        if realize.block.name_hint == "decode":
            found.append(realize.block)
            return tirx.Evaluate(0)
        return realize

    def drop_empty_loop(loop: tirx.For):
        return loop.body if _is_nothing(loop.body) else loop

    func = tvm_ffi.structural_map(func, [(SBlockRealize, drop), (tirx.For, drop_empty_loop)])
    (_,) = found
    return func, list(weight_gemm_params(func).stored)


def _is_nothing(stmt) -> bool:
    return isinstance(stmt, tirx.Evaluate) and isinstance(stmt.value, tirx.IntImm) and int(stmt.value) == 0


def install_tile_scatter(
    sch: s_tir.Schedule, tile_block, stored: list, config: TileConfig, m: int, k: int, barriers: bool
) -> s_tir.Schedule:
    """A new schedule of `sch.mod` in which the blockized W-tile block `tile_block` builds its tile by the
    stage's scatter from the `stored` buffers with the CTA's threads (`barriers`: __syncthreads() between
    zero-fill and scatter; False for the CPU replay, which runs threads one after another), and the
    unwritten W buffer of the removed "decode" block is gone."""
    func = sch.mod["main"]
    stage = decode_stage_of(func)
    assert stage.tile_scatter is not None
    old = sch.get(tile_block)
    (write,) = old.writes
    rows, cols = write.region
    region = ScatterRegion(rows.min, cols.min, int(rows.extent), int(cols.extent), m, k)
    threads = cuda_threads([("threadIdx.y", config.warps), ("threadIdx.x", WARP_SIZE)])
    if not barriers:
        threads = ScatterThreads(threads.count, threads.wrap, None)
    body, local = scatter_statement(stage.tile_scatter, stored, write.source, region, threads)
    reads = [BufferRegion(b, [Range(0, extent) for extent in b.shape]) for b in stored]
    new = SBlock(
        old.iter_vars, reads, old.writes, old.name_hint, body, alloc_buffers=local, annotations=old.annotations
    )
    (unused,) = [region.source for region in _inner_reads(old) if region.source.scope() == "global"]

    def replace_block(block: SBlock) -> SBlock:
        if block.same_as(old):
            return new
        if block.name_hint == "root":
            kept = [b for b in block.alloc_buffers if not b.same_as(unused)]
            return SBlock(
                block.iter_vars, block.reads, block.writes, block.name_hint, block.body, block.init, kept,
                block.match_buffers, block.annotations,
            )  # fmt: skip
        return block

    return s_tir.Schedule(tvm_ffi.structural_map(sch.mod, [(SBlock, replace_block)]))


def _inner_reads(block: SBlock) -> list:
    """The read regions of the block under the blockized W-tile block (the copy of the W buffer)."""
    found: list = []

    def collect(inner: SBlock) -> SBlock:
        found.append(inner)
        return inner

    tvm_ffi.structural_map(block.body, [(SBlock, collect)])
    return [region for b in found for region in b.reads]
