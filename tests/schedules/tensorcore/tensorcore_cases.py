"""Shared helpers of the Tensor Core tests: a packed test format and the replay/compare driver."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable

import numpy as np
import tvm
from tvm import te, tirx

from tensorpress.compiler.formats import decode_stage
from tensorpress.schedules.decode_stage import DecodeStage, StoredBuffer
from tensorpress.schedules.tensorcore.intrinsics import IntrinsicSet
from tensorpress.schedules.tensorcore.template import schedule_weight_gemm
from tensorpress.schedules.tensorcore.tile_config import TileConfig
from tensorpress.schedules.verification.cpu_replay import build_replay
from tensorpress.schedules.verification.tensorcore_emulation import emulated_intrinsics
from tensorpress.schedules.weight_gemm import ROW_SCALE_ATTR, make_weight_gemm

SMALL = TileConfig(block_n=16, block_m=64, block_k=32, warps=2, stages=2, split_k=1)


class PackedInt4Decode(DecodeStage):
    """A test format shaped like FPx: eight 4-bit codes per uint32 word (low nibble first) and an
    fp16 scale per row; W[m, k] = (code - 8) * scale[m]. Its words are staged in shared memory."""

    def __init__(self, name: str, staged: bool):
        self.name = name
        self.staged = staged

    def stored_buffers(self, m: int, k: int) -> list[StoredBuffer]:
        return [StoredBuffer("words", (m, k // 8), "uint32"), StoredBuffer("scale", (m,), "float16")]

    def decode(self, stored: list[te.Tensor], row, col, dtype: str):
        words, scale = stored
        shift = (col % 8).astype("uint32") * tirx.const(4, "uint32")
        code = (words[row, col // 8] >> shift) & tirx.const(15, "uint32")
        return (code.astype("int32") - 8).astype(dtype) * scale[row].astype(dtype)

    def staged_buffers(self, m: int, k: int) -> list[str]:
        return ["words"] if self.staged else []


INT4_STAGED = PackedInt4Decode("test-int4-staged", staged=True)
INT4_GLOBAL = PackedInt4Decode("test-int4-global", staged=False)
TEST_STAGES = {stage.name: stage for stage in (INT4_STAGED, INT4_GLOBAL)}


def stage_for(fmt: str) -> DecodeStage:
    """The decode stage of a registered format, or of one of this file's test formats."""
    return TEST_STAGES[fmt] if fmt in TEST_STAGES else decode_stage(fmt)


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [m, k] (0..15) -> uint32 words [m, k // 8], code i of a word in bits 4i..4i+3."""
    m, k = codes.shape
    nibbles = codes.reshape(m, k // 8, 8).astype(np.uint32)
    return np.bitwise_or.reduce(nibbles << (4 * np.arange(8, dtype=np.uint32)), axis=2)


def weight_and_stored(
    fmt: str, m: int, k: int, rng: np.random.Generator, sparsity: float = 0.8
) -> tuple[np.ndarray, list[np.ndarray], list[StoredBuffer]]:
    """A random weight in format `fmt`: its values W [m, k] (exact: fp16 or fp32), the arrays the kernel
    takes and their buffers (a sparse format's sizes follow its nonzeros: it is pruned to `sparsity`
    first, 80% by default; 1.0 leaves no nonzero)."""
    if fmt == "dense-fp16":
        w = rng.standard_normal((m, k)).astype(np.float16)
        return w, [w], stage_for(fmt).stored_buffers(m, k)
    if fmt == "dense-fp32":
        w = rng.standard_normal((m, k)).astype(np.float16)
        return w, [w.astype(np.float32)], stage_for(fmt).stored_buffers(m, k)
    if fmt.startswith("test-int4"):
        codes = rng.integers(0, 16, (m, k)).astype(np.uint8)
        scale = (rng.random(m) * 0.2 + 0.05).astype(np.float16)
        w = ((codes.astype(np.int32) - 8).astype(np.float16) * scale[:, None]).astype(np.float16)
        return w, [pack_int4(codes), scale], stage_for(fmt).stored_buffers(m, k)
    from tensorpress.compiler.formats import get_weight_format
    from tensorpress.compiler.pruning import prune

    weight_format = get_weight_format(fmt)
    dense = (rng.standard_normal((m, k)) * 0.05).astype(np.float32)
    if weight_format.sparse and sparsity >= 1.0:
        dense[:] = 0
    elif weight_format.sparse and sparsity > 0:
        dense = prune(dense, sparsity)
    packed = weight_format.pack(dense)
    w = weight_format.unpack(packed)  # float32, exact: an fp16 scale times a code's value, or an fp16 value
    return w, [np.ascontiguousarray(a) for a in packed.arrays.values()], packed.buffers


def reference_weight(func: tirx.PrimFunc, w: np.ndarray) -> np.ndarray:
    """The W the PrimFunc multiplies by, as float32: the decode block rounds each weight to the
    activations' dtype (fp16) unless the format's row scale moved to the epilogue (then the decoded
    values are exact and only the fp32 sums round)."""
    if bool(func.attrs.get(ROW_SCALE_ATTR, False)):
        return w.astype(np.float32)
    return w.astype(np.float16).astype(np.float32)


def replay_weight_gemm(
    fmt: str,
    m: int,
    k: int,
    n: int,
    config: TileConfig = SMALL,
    seed: int = 0,
    bias: bool = False,
    out_dtype: str = "float16",
    intrinsics: IntrinsicSet | None = None,
    mutate: Callable | None = None,
    row_scale_in_epilogue: bool = True,
    stage: DecodeStage | None = None,
    shuffle_seed: int | None = None,
    sparsity: float = 0.8,
) -> tuple[np.ndarray, np.ndarray]:
    """Schedule the weight GEMM with the emulated intrinsics, replay it on the CPU with shuffled
    threads and NaN-poisoned scratch memory; returns (Y from the kernel, Y from numpy), fp32.

    `seed` draws the inputs; `shuffle_seed` picks the order the serialized threads run in (default:
    `seed`), so the same inputs can be replayed in several thread orders.

    `mutate(sch)`, when given, edits the schedule before the build (planted bugs); `stage`, when
    given, replaces the decode stage of `fmt` (which still packs the weights: planted decode bugs)."""
    stage = stage or stage_for(fmt)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k)).astype(np.float16)
    w, stored, buffers = weight_and_stored(fmt, m, k, rng, sparsity)
    func = make_weight_gemm(
        stage, m, k, out_dtype=out_dtype, with_bias=bias, row_scale_in_epilogue=row_scale_in_epilogue, buffers=buffers
    )
    sch = schedule_weight_gemm(func, config, intrinsics or emulated_intrinsics())
    if mutate is not None:
        mutate(sch)
    kernel = build_replay(sch.mod, seed if shuffle_seed is None else shuffle_seed)["main"]
    reference = x.astype(np.float32) @ reference_weight(func, w).T
    args = [x, *stored]
    if bias:
        b = rng.standard_normal(m).astype(np.float16)
        args.append(b)
        reference = reference + b.astype(np.float32)
    y = np.full((n, m), np.nan, out_dtype)
    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in [*args, y]]
    kernel(*tensors)
    return tensors[-1].numpy().astype(np.float32), reference


def relative_error(out: np.ndarray, reference: np.ndarray) -> float:
    """max |out - ref| / max |ref|; NaN anywhere in `out` gives inf."""
    if np.isnan(out).any():
        return float("inf")
    return float(np.abs(out - reference).max() / np.abs(reference).max())


def once_per_session(tmp_path_factory, key: str, compute: Callable[[], dict]) -> dict:
    """compute() (a JSON-able dict) once per test session, however many pytest-xdist workers ask:
    the first computes it under a file lock and leaves it in the session's temp folder, the others
    wait for it and read it (nvcc builds of a whole tile grid take a minute a worker)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return compute()
    root = tmp_path_factory.getbasetemp().parent  # one folder for all the workers of a session
    path = root / f"{key}.json"
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if path.exists():
                return json.loads(path.read_text())
            result = compute()
            path.write_text(json.dumps(result))
            return result
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_tensor_core_kernels(kernels: list, config: TileConfig, arch: str):
    """What every shipped weight-GEMM config must show in its SASS: one kernel (two with split-K: the
    GEMM, then the fixed-order reduction), HMMA / LDSM / LDGSTS in the GEMM, nothing spilled or put on
    the stack, at most 255 registers, shared memory within the arch's limit. Returns the GEMM's report."""
    from tensorpress.schedules.tensorcore.arch import arch_spec

    assert len(kernels) == (1 if config.split_k == 1 else 2), [k.name for k in kernels]
    gemm = kernels[0]
    assert gemm.sass["HMMA"] > 0 and gemm.sass["LDSM"] > 0 and gemm.sass["LDGSTS"] > 0, gemm.summary()
    for kernel in kernels:
        assert kernel.spill_bytes == 0 and kernel.stack_bytes == 0, kernel.summary()
        assert kernel.sass["LDL"] == 0 and kernel.sass["STL"] == 0, kernel.summary()
        assert kernel.registers <= 255
    assert 0 < gemm.shared_bytes <= arch_spec(arch).shared_bytes_per_block, gemm.summary()
    return gemm
