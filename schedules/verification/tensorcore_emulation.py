"""The emulated intrinsic set: PTX semantics of ldmatrix and mma.sync in plain TIR loops.

Each emulated intrinsic has the same desc as its CUDA twin (`intrinsics.py`), so the schedule
tensorizes identically; only the impl differs. The impls do what the hardware does, step by step:

* ldmatrix.x4: lane L supplies the address `lane_row(L)` (the very expression the CUDA impl passes,
  relative to the matched shared region, with its runtime row stride); lane t receives row t // 4,
  columns 2·(t % 4) + {0, 1} of matrix j into slots 2j, 2j + 1. Every lane's address must be 16-byte
  aligned (8 fp16), as PTX requires; a misaligned one fails an assertion at run time.
* mma.sync.m16n8k16.row.col.f32.f16.f16.f32, twice (cols 0-7, 8-15; accumulator halves 0, 1): each
  accumulator register c_i of lane t adds Σ_k A[row, k]·B[k, col] for its (row, col) from the PTX
  fragment table, reading A and B from the lanes/registers that the PTX table says hold them.

* a B-fragment register pair written by a format's own decode (`EmulatedFragmentWriter`): bits
  0..15 go to slot 2·pair and bits 16..31 to slot 2·pair + 1 of the lane, as the 32-bit register
  the GPU writes holds them (the lower k in the low half).

The 32 lanes are ordinary loop iterations: a warp buffer is a plain array on the CPU. cp.async needs
no twin: the template writes global→shared copies as plain TIR stores, which the CUDA pipeline turns
into cp.async (zero-filled when predicated off) and the replay runs as the same stores.
"""

from __future__ import annotations

from typing import Any

import tvm_ffi
from tvm import tirx
from tvm.script import tirx as T

from tensorpress.schedules.tensorcore import fragments as frag
from tensorpress.schedules.tensorcore.intrinsics import (
    SHARED_SCOPE,
    STANDARD_ADDRESSING,
    STANDARD_PAIRS,
    FragmentWriter,
    IntrinsicSet,
    LaneRow,
    LdmatrixAddressing,
    PairAddressing,
    fill_desc,
    ldmatrix_desc,
    mma_desc,
    register_once,
    store_intrinsics,
)


def ldmatrix_emulated_impl(lane_row: LaneRow, shared_scope: str):
    @T.prim_func(s_tir=True)
    def impl(warp_handle: T.handle, shared_handle: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        shared = T.match_buffer(
            shared_handle,
            (16, 16),
            "float16",
            align=64,
            offset_factor=16,
            scope=shared_scope,
            strides=[s0, s1],
        )
        warp = T.match_buffer(warp_handle, (32, 8), "float16", align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:16, 0:16])
            T.writes(warp[0:32, 0:8])
            for lane in T.serial(32):
                row, col = T.meta_var(lane_row(lane))
                # & 7, not % 8: TVM 0.27's llvm codegen mis-binds the temporaries of a lowered floormod
                # when this check survives to run time (two asserts in one function).
                assert T.bitwise_and(shared.elem_offset + row * s0 + col, 7) == 0, (
                    "emulated ldmatrix: a lane's row address is not 16-byte aligned"
                )
            for t, j, half in T.grid(32, 4, 2):
                r, c = T.meta_var(frag.ldmatrix_received(t, j, half))
                row, col = T.meta_var(lane_row(8 * j + r))
                # Indexed 2-D, this flattens to the very address the hardware reads: the lane's row
                # address row·s0 + col plus c elements (also when col + c runs past the 16-wide tile).
                warp[t, 2 * j + half] = shared[row, col + c]

    return impl


def mma_emulated_impl():
    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (32, 8), "float16", align=64, offset_factor=16, scope="warp")
        B = T.match_buffer(b, (32, 8), "float16", align=64, offset_factor=16, scope="warp")
        C = T.match_buffer(c, (2, 32, 4), "float32", align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:2, 0:32, 0:4], A[0:32, 0:8], B[0:32, 0:8])
            T.writes(C[0:2, 0:32, 0:4])
            for half, t, reg in T.grid(2, 32, 4):
                for k in T.serial(16):
                    row, col = T.meta_var(frag.ptx_c_element(t, reg))
                    la, sa = T.meta_var(frag.a_register(row, k))
                    lb, sb = T.meta_var(frag.b_register(col + 8 * half, k))
                    C[half, t, reg] = C[half, t, reg] + T.Cast("float32", A[la, sa]) * T.Cast("float32", B[lb, sb])

    return impl


def fill_emulated_impl():
    @T.prim_func(s_tir=True)
    def impl(c: T.handle) -> None:
        C = T.match_buffer(c, (2, 32, 4), "float32", scope="warp", offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:2, 0:32, 0:4])
            for half, lane, reg in T.grid(2, 32, 4):
                C[half, lane, reg] = T.float32(0)

    return impl


class EmulatedFragmentWriter(FragmentWriter):
    """Lanes are a serial loop; a pair is two fp16 stores into the lane's row of the warp buffer."""

    def lane_loop(self, lane: tirx.Var, body: tirx.Stmt) -> tirx.Stmt:
        return tirx.For(lane, 0, 32, tirx.ForKind.SERIAL, body)

    def store_pair(self, fragment, tile: Any, lane: Any, pair: Any, bits: tirx.PrimExpr) -> tirx.Stmt:
        halves = [bits & tirx.const(0xFFFF, "uint32"), bits >> tirx.const(16, "uint32")]
        values = [tirx.reinterpret("float16", half.astype("uint16")) for half in halves]
        return tirx.SeqStmt([tirx.BufferStore(fragment, v, [tile, lane, 2 * pair + i]) for i, v in enumerate(values)])

    def lane_register(self, name: str) -> tirx.Buffer:
        return tirx.decl_buffer((32,), "uint32", name=name, scope="local")  # every lane's, poisoned

    def own(self, register: tirx.Buffer, lane: Any) -> list:
        return [lane]

    def read_up(self, register: tirx.Buffer, lane: Any, delta: int) -> tirx.PrimExpr:
        return tirx.BufferLoad(register, [tirx.Select(lane >= delta, lane - delta, lane)])  # shfl.up's rule

    def read_lane(self, register: tirx.Buffer, source: int) -> tirx.PrimExpr:
        return tirx.BufferLoad(register, [source])

    def lane_phases(self, lane: tirx.Var, setup: list, phases: list[list]) -> tirx.Stmt:
        # a serial lane loop a phase: every lane's writes land before any lane reads them
        loops = []
        for phase in phases:
            own = tirx.Var(lane.name, lane.ty)  # a loop variable is defined once in a function
            body = tvm_ffi.structural_map(
                tirx.SeqStmt([*setup, *phase]), (tirx.Var, lambda v, own=own: own if v.same_as(lane) else v)
            )
            loops.append(self.lane_loop(own, body))
        return tirx.SeqStmt(loops)


def emulated_intrinsics(
    addressing: LdmatrixAddressing = STANDARD_ADDRESSING,
    shared_scope: str = SHARED_SCOPE,
    pairs: PairAddressing = STANDARD_PAIRS,
) -> IntrinsicSet:
    """The emulated twin of `cuda_intrinsics(addressing, shared_scope)`, registered on first use."""
    tag = f"{shared_scope.replace('.', '_')}_{addressing.tag}"
    load_a = register_once(
        f"tensorpress_emu_ldmatrix_a_{tag}",
        lambda: (
            ldmatrix_desc(frag.a_register, shared_scope, "warp"),
            ldmatrix_emulated_impl(addressing.a_lane_row, shared_scope),
        ),
    )
    load_b = register_once(
        f"tensorpress_emu_ldmatrix_b_{tag}",
        lambda: (
            ldmatrix_desc(frag.b_register, shared_scope, "warp"),
            ldmatrix_emulated_impl(addressing.b_lane_row, shared_scope),
        ),
    )
    mma = register_once("tensorpress_emu_mma_m16n8k16_f16f32", lambda: (mma_desc("warp"), mma_emulated_impl()))
    fill = register_once("tensorpress_emu_mma_fill_f32", lambda: (fill_desc(), fill_emulated_impl()))
    return IntrinsicSet(
        kind="emulated",
        load_a=load_a,
        load_b=load_b,
        mma=mma,
        fill=fill,
        shared_scope=shared_scope,
        fragment_scope="warp",
        decode_b=EmulatedFragmentWriter(pairs),
        **store_intrinsics(shared_scope),
    )
