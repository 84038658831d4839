"""The CPU replay itself: serial shuffled threads, NaN poisoning, and the planted bugs it must catch.

Each planted bug is a schedule that TVM and nvcc/ptxas compile for the GPU without complaint (so
only running it could show the bug), and that the replay rejects: wrong results or a failed check.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tensorcore_cases import SMALL, relative_error, replay_weight_gemm, stage_for
from tvm import tirx
from tvm.script import tirx as T

from tensorpress.schedules.tensorcore import fragments as frag
from tensorpress.schedules.tensorcore.intrinsics import LdmatrixAddressing, cuda_intrinsics
from tensorpress.schedules.tensorcore.template import TemplateBlocks, schedule_weight_gemm
from tensorpress.schedules.tensorcore.tile_config import TileConfig
from tensorpress.schedules.verification.cpu_replay import build_replay, serialize_threads
from tensorpress.schedules.verification.cuda_inspection import compile_cubin, cuda_source
from tensorpress.schedules.verification.tensorcore_emulation import emulated_intrinsics
from tensorpress.schedules.weight_gemm import make_weight_gemm


def last_writer_kernel():
    """Every thread writes its index into one shared word; thread 0 then copies it out."""

    @T.prim_func(s_tir=True)
    def kernel(out: T.Buffer((1,), "int32")):
        shared = T.sblock_alloc_buffer((1,), "int32", scope="shared")
        for tx in T.thread_binding(32, thread="threadIdx.x"):
            with T.sblock("write"):
                T.reads()
                T.writes(shared[0])
                shared[0] = tx
        with T.sblock("read"):
            out[0] = shared[0]

    return tvm.IRModule({"main": kernel})


def test_serialized_threads_are_serial_loops_tagged_with_their_thread():
    mod = serialize_threads(last_writer_kernel(), seed=3)
    loops = []
    tvm_ffi_map = __import__("tvm_ffi").structural_map
    tvm_ffi_map(mod, (tirx.For, lambda loop: loops.append(loop) or loop))
    assert [(int(loop.kind), str(loop.annotations["tensorpress.replay_thread"])) for loop in loops] == [
        (int(tirx.ForKind.SERIAL), "threadIdx.x")
    ]
    # the order is drawn now and applied once the buffers are compacted (shuffle_threads)
    stride, offset = (int(v) for v in loops[0].annotations["tensorpress.replay_order"])
    assert 1 <= stride < 32 and np.gcd(stride, 32) == 1 and 0 <= offset < 32


def test_shuffled_order_changes_which_thread_runs_last():
    results = set()
    for seed in [None, 1, 2, 3, 4, 5]:
        out = tvm.runtime.tensor(np.zeros(1, np.int32))
        build_replay(last_writer_kernel(), seed)["main"](out)
        results.add(int(out.numpy()[0]))
    assert 31 in results  # natural order: thread 31 last
    assert len(results) > 1  # a race on a shared word shows up as seed-dependent output


def test_shuffled_order_still_visits_every_thread_once():
    @T.prim_func(s_tir=True)
    def kernel(out: T.Buffer((4, 32), "int32")):
        for bx in T.thread_binding(4, thread="blockIdx.x"):
            for tx in T.thread_binding(32, thread="threadIdx.x"):
                with T.sblock("write"):
                    b, t = T.axis.remap("SS", [bx, tx])
                    out[b, t] = out[b, t] + b * 32 + t + 1

    out = tvm.runtime.tensor(np.zeros((4, 32), np.int32))
    build_replay(tvm.IRModule({"main": kernel}), seed=9)["main"](out)
    assert np.array_equal(out.numpy(), np.arange(1, 129).reshape(4, 32))


@pytest.mark.parametrize("shuffle_seed", [4, 64])
def test_a_shuffled_predicated_copy_still_compacts(shuffle_seed):
    # e3m3's plane1 copy at 16x32x64 (two words a row: 64 words over 128 thread slots, predicated).
    # Shuffled before TVM's CompactBufferAllocation, these orders left a copy loop's variable in
    # plane1_shared's offset ("ax0_ax1_fused_1 has been used before definition").
    config = TileConfig(block_n=16, block_m=32, block_k=64, warps=2, stages=2)
    out, ref = replay_weight_gemm("e3m3", 64, 256, 17, config, seed=1, shuffle_seed=shuffle_seed)
    assert relative_error(out, ref) < 2e-3


def test_scratch_memory_reads_nan_until_written():
    @T.prim_func(s_tir=True)
    def kernel(out: T.Buffer((8,), "float32")):
        shared = T.sblock_alloc_buffer((16,), "float32", scope="shared")
        for tx in T.thread_binding(8, thread="threadIdx.x"):
            with T.sblock("write_half"):
                t = T.axis.spatial(8, tx)
                shared[t] = T.float32(1)
        for i in range(8):
            with T.sblock("read_other_half"):
                v = T.axis.spatial(8, i)
                out[v] = shared[v + 8]  # never written: a missing initialisation

    out = tvm.runtime.tensor(np.zeros(8, np.float32))
    build_replay(tvm.IRModule({"main": kernel}), seed=0)["main"](out)
    assert np.isnan(out.numpy()).all()


# --- planted bugs ------------------------------------------------------------------------------------

BAD_K_HALF = LdmatrixAddressing(
    "bad_k_half",  # B tiles: lanes 8-15 / 24-31 point 16 columns on instead of 8
    b_lane_row=lambda lane: (8 * (lane // 16) + lane % 8, 16 * ((lane // 8) % 2)),
)


def unswizzled_x_fetch(sch, intrinsics):
    """X is stored unswizzled while ldmatrix still reads it through the XOR swizzle."""
    sch.unannotate(TemplateBlocks.of(sch, intrinsics).x_shared, "permuted_layout")


def misaligned_w_rows(sch, intrinsics):
    """The decoded W tile gets a row pitch of +4 fp16 (8 bytes): rows no longer 16-byte aligned."""
    sch.storage_align(TemplateBlocks.of(sch, intrinsics).w_shared, 0, axis=-2, factor=32, offset=4)


PLANTED = {
    "wrong swizzle": ("dense-fp16", None, unswizzled_x_fetch),
    "wrong fragment offset": ("dense-fp16", BAD_K_HALF, None),
    "misaligned row": ("test-int4-staged", None, misaligned_w_rows),
}


@pytest.fixture(scope="module")
def planted_cuda_compiles():
    """Each planted bug, scheduled with the CUDA intrinsics and compiled by nvcc for sm_80: it builds."""
    built = {}
    for name, (fmt, addressing, mutate) in PLANTED.items():
        intrinsics = cuda_intrinsics(addressing) if addressing else cuda_intrinsics()
        sch = schedule_weight_gemm(make_weight_gemm(stage_for(fmt), 128, 256), SMALL, intrinsics)
        if mutate:
            mutate(sch, intrinsics)
        cubin, _ = compile_cubin(cuda_source(sch.mod, "sm_80"), "sm_80")
        built[name] = len(cubin)
    return built


@pytest.mark.parametrize("bug", list(PLANTED))
def test_planted_bug_compiles_for_cuda_and_fails_the_replay(bug, planted_cuda_compiles):
    assert planted_cuda_compiles[bug] > 0
    fmt, addressing, mutate = PLANTED[bug]
    intrinsics = emulated_intrinsics(addressing) if addressing else emulated_intrinsics()
    # the same schedule without the bug passes
    good, ref = replay_weight_gemm(fmt, 128, 256, 9, SMALL, seed=1)
    assert relative_error(good, ref) < 2e-3
    try:
        out, ref = replay_weight_gemm(
            fmt, 128, 256, 9, SMALL, seed=1, intrinsics=intrinsics,
            mutate=(lambda sch: mutate(sch, intrinsics)) if mutate else None,
        )  # fmt: skip
    except Exception as err:  # the emulated ldmatrix's alignment check
        assert "16-byte aligned" in str(err), err
        return
    assert relative_error(out, ref) > 0.05


def test_wrong_lane_address_is_not_a_layout_the_descs_accept():
    # sanity of the planted offset: lanes 8-15 of the bad B addressing point at another tile column
    assert BAD_K_HALF.b_lane_row(9) != frag.b_lane_row(9)
    assert BAD_K_HALF.b_lane_row(1) == frag.b_lane_row(1)
