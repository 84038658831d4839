"""The Tensor Core intrinsics the GEMM template tensorizes onto, registered by tensorpress itself.

Five intrinsics, each a (desc, impl) pair registered with `TensorIntrin.register`:

    load_a   shared [16, 16] fp16  -> warp [32, 8]   ldmatrix.x4           (tokens × k tile)
    load_b   shared [16, 16] fp16  -> warp [32, 8]   ldmatrix.x4           (weight rows × k tile)
    mma      C += A · Bᵀ on warp buffers              2 × mma.sync.m16n8k16.row.col.f32.f16.f16.f32
    fill     warp [2, 32, 4] fp32 = 0                 mma_fill
    store    warp [2, 32, 4] fp32 -> [16, 16] fp32    plain stores (to shared or global)

The descs say, with the layouts of `fragments.py`, exactly which element lands in which (lane, slot),
so they describe the hardware's register contents truthfully (TVM's stock B-fragment desc does not).

Where the fragments live. Logically each operand tile is a [32 lanes, 8 slots] buffer. On the GPU the
A/B tiles use the scope "m16n8k8.matrixA": TVM's TransformMmaBufferLayout turns the trailing (32, 8)
of such a buffer into 8 registers per lane, and the impls address them per lane (elem_offset // 32),
which is how TVM's own m16n8k8 intrinsics work. (The "warp" scope would rely on LowerWarpMemory, which
in TVM 0.27 lowers only the first warp buffer of a scope and cannot see through CSE'd ldmatrix
offsets: the fragments ended up as 32-lane arrays on the stack.) The accumulator stays "warp" (its
epilogue reads it with plain loads, which TransformMmaBufferLayout forbids), laid out [2, 32, 4] so
that every constant offset is a multiple of one mma's 128 values and LowerWarpMemory's index split
simplifies to constants (with [32, 8] tiles it left `(tx*8 + 260) / 256` behind: a stack array).
The emulated set keeps A/B as "warp" buffers too, which on the CPU are plain arrays, every lane
visible.
Beside the five, a `FragmentWriter` puts 32-bit register pairs that a format decodes itself
(a decode stage's fragment decode, `schedules/decode_stage.py`) into a B fragment: on the GPU one
register move per pair through a two-line device function, in the replay two fp16 stores; both from
one `PairAddressing`, which says which (col, k) pair of a B tile each lane's register holds
(`fragments.b_pair_element`).

An `IntrinsicSet` names one complete set. `cuda_intrinsics()` emits PTX; the twin built by
`emulated_intrinsics()` (`schedules/verification/tensorcore_emulation.py`) has the same descs and
replays the PTX semantics in plain loops, so one schedule function serves both (see
`schedules/verification/cpu_replay.py`). Both are built from one `LdmatrixAddressing`: the per-lane
row addresses the impl hands to ldmatrix, the only address math inside an intrinsic.
We never import `tvm.s_tir.tensor_intrin` (a 40 s import).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tvm
from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from tensorpress.schedules.tensorcore import fragments as frag

SHARED_SCOPE = "shared.dyn"
GPU_FRAGMENT_SCOPE = "m16n8k8.matrixA"  # (32, 8) -> 8 registers per lane, see the module docstring
LaneRow = Callable[[Any], tuple[Any, Any]]


@dataclass(frozen=True)
class LdmatrixAddressing:
    """Which tile row (row, first column) each of the 32 lanes points ldmatrix at, per operand."""

    tag: str
    a_lane_row: LaneRow = frag.a_lane_row
    b_lane_row: LaneRow = frag.b_lane_row


STANDARD_ADDRESSING = LdmatrixAddressing("std")


@dataclass(frozen=True)
class PairAddressing:
    """Which (col, k) of a 16×16 B tile register pair `pair` (0..3) of each lane holds: the pair
    B[col, k], B[col, k + 1] a fragment decode puts there (low half, high half)."""

    tag: str
    pair_element: Callable[[Any, Any], tuple[Any, Any]] = frag.b_pair_element


STANDARD_PAIRS = PairAddressing("std")
PAIRS_PER_TILE = 4  # 32-bit registers per lane in one 16×16 B tile (8 fp16 slots)


class FragmentWriter:
    """How decoded register pairs reach a B fragment buffer of shape [tiles, 32 lanes, 8 slots].

    `lane_loop` wraps the per-lane code in the loop over the warp's lanes and `store_pair` writes the
    32-bit `bits` (two fp16 patterns, the lower k in bits 0..15) into slots 2·pair, 2·pair + 1 of
    `lane` in tile `tile`. The GPU writer (`CudaFragmentWriter`) and its replay twin
    (`emulation.EmulatedFragmentWriter`) share `addressing`.
    """

    def __init__(self, addressing: PairAddressing = STANDARD_PAIRS):
        self.addressing = addressing

    def lane_loop(self, lane: tirx.Var, body: tirx.Stmt) -> tirx.Stmt:
        raise NotImplementedError

    def store_pair(self, fragment, tile: Any, lane: Any, pair: Any, bits: tirx.PrimExpr) -> tirx.Stmt:
        raise NotImplementedError

    # Lanes that read one another's values (a scan over a unit's rows): each exchanged value is a
    # lane register of its own, written in one phase and read, by any lane, in a later one.

    def lane_register(self, name: str) -> tirx.Buffer:
        """A uint32 register of every lane that other lanes may read (`read_up`, `read_lane`)."""
        raise NotImplementedError

    def own(self, register: tirx.Buffer, lane: Any) -> list:
        """The index of `lane`'s own element of a `lane_register`."""
        raise NotImplementedError

    def read_up(self, register: tirx.Buffer, lane: Any, delta: int) -> tirx.PrimExpr:
        """The register of lane `lane - delta` (of `lane` itself when lane < delta, as shfl.up)."""
        raise NotImplementedError

    def read_lane(self, register: tirx.Buffer, source: int) -> tirx.PrimExpr:
        """The register of lane `source`."""
        raise NotImplementedError

    def lane_phases(self, lane: tirx.Var, setup: list, phases: list[list]) -> tirx.Stmt:
        """The phases (statement lists) of the lanes' work in order, each finished by every lane before a
        lane reads, in a later phase, what it wrote; `setup` (per-lane registers the phases read) first."""
        raise NotImplementedError


# One register move: the fragment is a per-lane register array (TransformMmaBufferLayout), which the
# lowering lets only opaque calls touch, as ldmatrix and mma do; nvcc inlines it to a MOV (or nothing).
_SET_B32 = "tensorpress_set_b32"
_SET_B32_SOURCE = (
    f"__device__ __forceinline__ void {_SET_B32}(void* reg, unsigned int bits) {{\n"
    "  *reinterpret_cast<unsigned int*>(reg) = bits;\n}\n"
)

# Warp shuffles of the whole warp (every lane of a fragment decode runs them): a lane register read by
# another lane. Always stored to a register before any select: a shuffle under `?:` would diverge.
_SHFL_UP, _SHFL = "tensorpress_shfl_up", "tensorpress_shfl"
_SHFL_UP_SOURCE = (  # one function a source: the codegen includes each source once per name
    f"__device__ __forceinline__ unsigned int {_SHFL_UP}(unsigned int v, int delta) {{\n"
    "  return __shfl_up_sync(0xffffffffu, v, delta);\n}\n"
)
_SHFL_SOURCE = (
    f"__device__ __forceinline__ unsigned int {_SHFL}(unsigned int v, int lane) {{\n"
    "  return __shfl_sync(0xffffffffu, v, lane);\n}\n"
)


class CudaFragmentWriter(FragmentWriter):
    """Lanes are threadIdx.x; a pair is one 32-bit store into the lane's fragment registers."""

    def lane_loop(self, lane: tirx.Var, body: tirx.Stmt) -> tirx.Stmt:
        binding = tirx.IterVar(tvm.ir.Range(0, 32), lane, tirx.IterVar.ThreadIndex, "threadIdx.x")
        return tirx.For(lane, 0, 32, tirx.ForKind.THREAD_BINDING, body, binding)

    def store_pair(self, fragment, tile: Any, lane: Any, pair: Any, bits: tirx.PrimExpr) -> tirx.Stmt:
        from tvm.backend.cuda.op import cuda_func_call

        # The lane's 8 registers of a [32, 8] tile start at elem_offset // 32, as the mma impl reads them.
        offset = fragment.elem_offset // 32 + tile * 8 + 2 * pair
        pointer = tirx.call_intrin(
            "handle", "tirx.tvm_access_ptr", tirx.type_annotation("float16"), fragment.data, offset, 2, 2
        )
        return tirx.Evaluate(cuda_func_call(_SET_B32, pointer, bits, source_code=_SET_B32_SOURCE))

    def lane_register(self, name: str) -> tirx.Buffer:
        return tirx.decl_buffer((1,), "uint32", name=name, scope="local")

    def own(self, register: tirx.Buffer, lane: Any) -> list:
        return [0]

    def read_up(self, register: tirx.Buffer, lane: Any, delta: int) -> tirx.PrimExpr:
        from tvm.backend.cuda.op import cuda_func_call

        value = tirx.BufferLoad(register, [0])
        return cuda_func_call(_SHFL_UP, value, delta, source_code=_SHFL_UP_SOURCE, return_type="uint32")

    def read_lane(self, register: tirx.Buffer, source: int) -> tirx.PrimExpr:
        from tvm.backend.cuda.op import cuda_func_call

        value = tirx.BufferLoad(register, [0])
        return cuda_func_call(_SHFL, value, source, source_code=_SHFL_SOURCE, return_type="uint32")

    def lane_phases(self, lane: tirx.Var, setup: list, phases: list[list]) -> tirx.Stmt:
        # one thread a lane, in program order: a warp's shuffles keep its lanes in step
        return self.lane_loop(lane, tirx.SeqStmt([*setup, *(s for phase in phases for s in phase)]))


@dataclass(frozen=True)
class IntrinsicSet:
    """Names of registered tensor intrinsics the template uses, plus what they run as."""

    kind: str  # "cuda" (PTX) or "emulated" (plain loops, for the CPU replay)
    load_a: str
    load_b: str
    mma: str
    fill: str
    store_shared: str
    store_global: str
    shared_scope: str = SHARED_SCOPE
    fragment_scope: str = GPU_FRAGMENT_SCOPE  # A/B operand tiles; the accumulator is always "warp"
    decode_b: FragmentWriter = CudaFragmentWriter()  # for stages that decode into B registers


# --- descs (shared by the CUDA and emulated sets) -------------------------------------------------


def ldmatrix_desc(register_of: Callable, shared_scope: str, fragment_scope: str):
    @T.prim_func(s_tir=True)
    def desc(warp_handle: T.handle, shared_handle: T.handle) -> None:
        shared = T.match_buffer(shared_handle, (16, 16), "float16", align=64, offset_factor=16, scope=shared_scope)
        warp = T.match_buffer(warp_handle, (32, 8), "float16", align=64, offset_factor=16, scope=fragment_scope)
        with T.sblock("root"):
            T.reads(shared[0:16, 0:16])
            T.writes(warp[0:32, 0:8])
            for ax0, ax1 in T.grid(16, 16):
                with T.sblock("shared_warp"):
                    v0, v1 = T.axis.remap("SS", [ax0, ax1])
                    lane, slot = T.meta_var(register_of(v0, v1))
                    T.reads(shared[v0, v1])
                    T.writes(warp[lane, slot])
                    warp[lane, slot] = shared[v0, v1]

    return desc


def mma_desc(fragment_scope: str):
    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (32, 8), "float16", align=64, offset_factor=16, scope=fragment_scope)
        B = T.match_buffer(b, (32, 8), "float16", align=64, offset_factor=16, scope=fragment_scope)
        C = T.match_buffer(c, (2, 32, 4), "float32", align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:2, 0:32, 0:4], A[0:32, 0:8], B[0:32, 0:8])
            T.writes(C[0:2, 0:32, 0:4])
            for i, j, k in T.grid(16, 16, 16):
                with T.sblock("C"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    hc, lc, rc = T.meta_var(frag.c_register(vi, vj))
                    la, sa = T.meta_var(frag.a_register(vi, vk))
                    lb, sb = T.meta_var(frag.b_register(vj, vk))
                    T.reads(C[hc, lc, rc], A[la, sa], B[lb, sb])
                    T.writes(C[hc, lc, rc])
                    C[hc, lc, rc] = C[hc, lc, rc] + T.Cast("float32", A[la, sa]) * T.Cast("float32", B[lb, sb])

    return desc


# --- fill (desc) and store (plain TIR stores, identical on the GPU and in the replay) ---------------


def fill_desc():
    @T.prim_func(s_tir=True)
    def desc(c: T.handle) -> None:
        C = T.match_buffer(c, (2, 32, 4), "float32", scope="warp")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:2, 0:32, 0:4])
            for i, j in T.grid(16, 16):
                with T.sblock("C_warp"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    half, lane, reg = T.meta_var(frag.c_register(vi, vj))
                    T.reads()
                    T.writes(C[half, lane, reg])
                    C[half, lane, reg] = T.float32(0)

    return desc


def fill_cuda_impl():
    # TVM's mma_fill builtin: per lane, 8 register stores. (Plain TIR stores into a warp buffer would
    # reach LowerWarpMemory with the lane index hidden by common-subexpression elimination.)
    @T.prim_func(s_tir=True)
    def impl(c: T.handle) -> None:
        C = T.match_buffer(c, (2, 32, 4), "float32", scope="warp", offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:2, 0:32, 0:4])
            for _lane in T.thread_binding(0, 32, "threadIdx.x"):
                for half in T.unroll(2):
                    T.evaluate(T.cuda.mma_fill_legacy(4, C.data, C.elem_offset + half * 128, dtype="float32"))

    return impl


def store_intrin(scope: str):
    @T.prim_func(s_tir=True)
    def desc(c_warp: T.handle, c: T.handle) -> None:
        W = T.match_buffer(c_warp, (2, 32, 4), "float32", scope="warp")
        C = T.match_buffer(c, (16, 16), "float32", scope=scope)
        with T.sblock("root"):
            T.reads(W[0:2, 0:32, 0:4])
            T.writes(C[0:16, 0:16])
            for i, j in T.grid(16, 16):
                with T.sblock("C_warp"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    half, lane, reg = T.meta_var(frag.c_register(vi, vj))
                    T.reads(W[half, lane, reg])
                    T.writes(C[vi, vj])
                    C[vi, vj] = W[half, lane, reg]

    @T.prim_func(s_tir=True)
    def impl(c_warp: T.handle, c: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        W = T.match_buffer(c_warp, (2, 32, 4), "float32", scope="warp", offset_factor=1)
        C = T.match_buffer(c, (16, 16), "float32", scope=scope, offset_factor=1, strides=[s0, s1])
        with T.sblock("root"):
            T.reads(W[0:2, 0:32, 0:4])
            T.writes(C[0:16, 0:16])
            for tx in T.thread_binding(0, 32, "threadIdx.x"):
                for half, reg in T.grid(2, 4):
                    row, col = T.meta_var(frag.c_element(half, tx, reg))
                    C[row, col] = W[half, tx, reg]

    return desc, impl


# --- PTX impls -------------------------------------------------------------------------------------


def ldmatrix_cuda_impl(lane_row: LaneRow, shared_scope: str):
    """ldmatrix.x4.b16: lane tx passes the address of tile row `lane_row(tx)`; 4 registers per lane."""

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
        warp = T.match_buffer(warp_handle, (32, 8), "float16", align=64, offset_factor=16, scope=GPU_FRAGMENT_SCOPE)
        with T.sblock("root"):
            T.reads(shared[0:16, 0:16])
            T.writes(warp[0:32, 0:8])
            for tx in T.thread_binding(0, 32, "threadIdx.x"):
                row, col = T.meta_var(lane_row(tx))
                T.evaluate(
                    T.ptx_legacy.ldmatrix(
                        False,
                        4,
                        ".b16",
                        warp.data,
                        warp.elem_offset // 32,  # this lane's 8 values of the tile
                        shared.access_ptr("r"),
                        row * s0 + col,
                        dtype="float16",
                    )
                )

    return impl


def mma_cuda_impl():
    """Two mma.sync.m16n8k16 (cols 0-7, then 8-15: B slots +4, C half +1), fp32 accumulate in place."""

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (32, 8), "float16", align=64, offset_factor=16, scope=GPU_FRAGMENT_SCOPE)
        B = T.match_buffer(b, (32, 8), "float16", align=64, offset_factor=16, scope=GPU_FRAGMENT_SCOPE)
        C = T.match_buffer(c, (2, 32, 4), "float32", align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:2, 0:32, 0:4], A[0:32, 0:8], B[0:32, 0:8])
            T.writes(C[0:2, 0:32, 0:4])
            for tx in T.thread_binding(0, 32, "threadIdx.x"):
                for half in T.unroll(2):
                    T.evaluate(
                        T.ptx_legacy.mma(
                            "m16n8k16",
                            "row",
                            "col",
                            "fp16",
                            "fp16",
                            "fp32",
                            A.data,
                            A.elem_offset // 32,
                            B.data,
                            B.elem_offset // 32 + half * 4,
                            C.data,
                            C.elem_offset + half * 128 + tx * 4,
                            False,
                            dtype="float32",
                        )
                    )

    return impl


# --- registration ----------------------------------------------------------------------------------

_REGISTERED: set[str] = set()


def register_once(name: str, make_pair: Callable[[], tuple[Any, Any]]) -> str:
    """Register the (desc, impl) pair `make_pair()` as `name` unless this process already did."""
    if name not in _REGISTERED:
        TensorIntrin.register(name, *make_pair(), override=True)
        _REGISTERED.add(name)
    return name


def _scope_tag(scope: str) -> str:
    return scope.replace(".", "_")


def store_intrinsics(shared_scope: str) -> dict[str, str]:
    """The accumulator stores: plain TIR, the same for the CUDA and the emulated set."""
    tag = _scope_tag(shared_scope)
    return {
        "store_shared": register_once(f"tensorpress_mma_store_f32_{tag}", lambda: store_intrin(shared_scope)),
        "store_global": register_once("tensorpress_mma_store_f32_global", lambda: store_intrin("global")),
    }


def cuda_intrinsics(
    addressing: LdmatrixAddressing = STANDARD_ADDRESSING,
    shared_scope: str = SHARED_SCOPE,
    pairs: PairAddressing = STANDARD_PAIRS,
) -> IntrinsicSet:
    """The PTX intrinsic set (ldmatrix.x4 + mma.sync m16n8k16), registered on first use."""
    tag = f"{_scope_tag(shared_scope)}_{addressing.tag}"
    load_a = register_once(
        f"tensorpress_ldmatrix_a_{tag}",
        lambda: (
            ldmatrix_desc(frag.a_register, shared_scope, GPU_FRAGMENT_SCOPE),
            ldmatrix_cuda_impl(addressing.a_lane_row, shared_scope),
        ),
    )
    load_b = register_once(
        f"tensorpress_ldmatrix_b_{tag}",
        lambda: (
            ldmatrix_desc(frag.b_register, shared_scope, GPU_FRAGMENT_SCOPE),
            ldmatrix_cuda_impl(addressing.b_lane_row, shared_scope),
        ),
    )
    mma = register_once("tensorpress_mma_m16n8k16_f16f32", lambda: (mma_desc(GPU_FRAGMENT_SCOPE), mma_cuda_impl()))
    fill = register_once("tensorpress_mma_fill_f32", lambda: (fill_desc(), fill_cuda_impl()))
    return IntrinsicSet(
        kind="cuda",
        load_a=load_a,
        load_b=load_b,
        mma=mma,
        fill=fill,
        shared_scope=shared_scope,
        decode_b=CudaFragmentWriter(pairs),
        **store_intrinsics(shared_scope),
    )
