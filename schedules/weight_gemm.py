"""The weight GEMM: the one op every weight format compiles to.

    Y[n, m] = sum_k X[n, k] * W[m, k]  (+ bias[m])        X: [N, K], W: [M, K], Y: [N, M]

N (tokens) is symbolic (`n`, int64) so one kernel serves every batch; M and K are the layer's sizes.
W is never an input: the format's `DecodeStage` (`decode_stage.py`) reads the buffers the format stores
(fp16 matrix, FPx bit planes + scales, ...) and gives the TIR expression of W[m, k] from them. That expression is
the format's one definition of its decode math: the CPU schedule and the Tensor Core template schedule
the same PrimFunc, and tests compare it bit for bit with the format's numpy reference.

Blocks of the PrimFunc (schedules find them by these names):
    "decode"  W_decoded[m, k] = stage.decode(stored..., m, k)       (compute dtype)
    "gemm"    acc[n, m] += f32(X[n, k]) * f32(W_decoded[m, k])       (fp32 accumulation)
    "store"   Y[n, m] = cast(epilogue(acc[n, m] (+ bias[m])))    epilogue: `gemm_epilogue.py`

The PrimFunc carries attributes that schedule rules match on:
    tensorpress.kernel = "weight_gemm", tensorpress.format = stage.name, tensorpress.mk = [M, K]
    (and tensorpress.n_hint, when the pipeline knows about how many tokens the kernel will see)
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import te, tirx

from tensorpress.schedules.decode_stage import DecodeStage, StoredBuffer
from tensorpress.schedules.gemm_epilogue import RESIDUAL_NAME, GemmEpilogue

KERNEL_ATTR = "tensorpress.kernel"
FORMAT_ATTR = "tensorpress.format"
# Set by the compile pipeline: about how many rows N a kernel will see (N itself stays symbolic), so a
# schedule can choose its token tile (16 for decode steps, larger for prefill and encoders).
N_HINT_ATTR = "tensorpress.n_hint"
# Set by make_weight_gemm: True when the format's per-row factor multiplies Y after the sum over k.
ROW_SCALE_ATTR = "tensorpress.row_scale_in_epilogue"
KERNEL_NAME = "weight_gemm"
BIAS_NAME = "bias"  # the bias argument's buffer name


# The stage each weight-GEMM PrimFunc was made with, under the format name the PrimFunc carries
# (FORMAT_ATTR): the schedules ask `decode_stage_of(func)` for it. Filled by make_weight_gemm only.
_STAGE_OF_FORMAT: dict[str, DecodeStage] = {}


@dataclass(frozen=True)
class WeightGemmParams:
    """The buffers of a weight-GEMM PrimFunc by role (TVM 0.27: a PrimFunc's params are its buffers)."""

    x: tirx.Buffer
    stored: list[tirx.Buffer]
    bias: tirx.Buffer | None
    residual: tirx.Buffer | None
    y: tirx.Buffer


def weight_gemm_params(func: tirx.PrimFunc) -> WeightGemmParams:
    """`make_weight_gemm`'s arguments X, the stored buffers, (bias,) (residual,) Y, told apart by name."""
    x, *middle, y = func.params
    by_name = {str(b.name): b for b in middle}
    stored = [b for b in middle if str(b.name) not in (BIAS_NAME, RESIDUAL_NAME)]
    return WeightGemmParams(x, stored, by_name.get(BIAS_NAME), by_name.get(RESIDUAL_NAME), y)


def decode_stage_of(func: tirx.PrimFunc) -> DecodeStage:
    """The decode stage a weight-GEMM PrimFunc was made with (by `make_weight_gemm`, in this process)."""
    name = str(func.attrs[FORMAT_ATTR])
    try:
        return _STAGE_OF_FORMAT[name]
    except KeyError:
        raise KeyError(f"no weight GEMM of format {name!r} was made in this process") from None


def make_weight_gemm(
    stage: DecodeStage,
    m: int,
    k: int,
    act_dtype: str = "float16",
    out_dtype: str | None = None,
    with_bias: bool = False,
    n: int | None = None,
    row_scale_in_epilogue: bool = True,
    buffers: list[StoredBuffer] | None = None,
    epilogue: GemmEpilogue | None = None,
) -> tirx.PrimFunc:
    """Build the weight-GEMM PrimFunc for an [m, k] weight stored as `stage` describes.

    Arguments of the PrimFunc, in order: X [n, k] act_dtype, each stored buffer, bias [m] (if
    with_bias, act_dtype), residual [n, m] out_dtype (if the epilogue adds one), Y [n, m] out_dtype
    (default act_dtype). `n=None` makes N symbolic. `epilogue`: activation and residual applied in
    the store stage (`gemm_epilogue.py`; default none).
    `buffers`: the stored buffers of the packed weight (default: `stage.stored_buffers(m, k)`, for
    formats whose buffers follow from the shape).

    A stage whose W is a per-row factor times an unscaled value (`stage.scales_rows`, see
    `decode_stage.py`) gets, unless row_scale_in_epilogue is False, the factor applied once per output
    in fp32 after the sum:
        "decode"  W_decoded[m, k] = stage.unscaled_decode(stored..., m, k)
        "store"   Y[n, m] = cast(acc[n, m] * row_scale(m) (+ bias[m]))
    Same math, one multiply per output instead of one per weight; only the rounding differs (the
    weights are no longer rounded to the compute dtype after scaling). The PrimFunc then carries the
    attribute tensorpress.row_scale_in_epilogue = True.
    """
    out_dtype = out_dtype or act_dtype
    epilogue = epilogue or GemmEpilogue()
    rows = tirx.Var("n", "int64") if n is None else n
    x = te.placeholder((rows, k), act_dtype, name="X")
    buffers = stage.stored_buffers(m, k) if buffers is None else buffers
    stored = [te.placeholder(b.shape, b.dtype, name=b.name) for b in buffers]
    if stage.row_slots is not None:
        return _row_slot_gemm(stage, stage.row_slots, m, k, x, stored, act_dtype, out_dtype, with_bias, epilogue)
    factored = row_scale_in_epilogue and stage.scales_rows
    decode = stage.unscaled_decode if factored else stage.decode
    scatter_defines_w = stage.tile_scatter is not None and not stage.decodes_elements
    if scatter_defines_w:  # a zero placeholder, replaced below by the scatter
        decode = lambda *_: tirx.const(0, act_dtype)  # noqa: E731
    w = te.compute((m, k), lambda r, c: decode(stored, r, c, act_dtype), name="decode")
    rk = te.reduce_axis((0, k), name="k")
    acc = te.compute(
        (rows, m),
        lambda i, j: te.sum(x[i, rk].astype("float32") * w[j, rk].astype("float32"), axis=rk),
        name="gemm",
    )

    def scaled(i, j):
        return acc[i, j] * stage.row_scale(stored, j) if factored else acc[i, j]

    def with_bias_added(i, j):
        return scaled(i, j) + bias[j].astype("float32") if with_bias else scaled(i, j)

    args = [x, *stored]
    if with_bias:
        bias = te.placeholder((m,), act_dtype, name=BIAS_NAME)
        args.append(bias)
    store = _store(epilogue, rows, m, out_dtype, args)
    y = te.compute((rows, m), lambda i, j: store(with_bias_added(i, j), i, j), name="store")
    func = te.create_prim_func([*args, y])
    if scatter_defines_w:
        func = _with_scatter_decode(func, stage, m, k, len(stored))
    _STAGE_OF_FORMAT[stage.name] = stage
    return func.with_attrs(
        {
            **epilogue.attrs(),
            KERNEL_ATTR: KERNEL_NAME,
            FORMAT_ATTR: stage.name,
            ROW_SCALE_ATTR: bool(factored),
            "tensorpress.mk": [m, k],
            "tirx.noalias": True,
            # Opaque to Relax's FuseOps: the kernel is scheduled whole by its own rule, and its bias and
            # casts are already inside it.
            "op_pattern": 8,
        }
    )


def _store(epilogue: GemmEpilogue, rows, m: int, out_dtype: str, args: list):
    """store(value, i, j): Y[i, j] from the fp32 sum (after row scale and bias) through `epilogue`;
    appends the residual placeholder to `args` when the epilogue reads one."""
    residual = None
    if epilogue.residual:
        residual = te.placeholder((rows, m), out_dtype, name=RESIDUAL_NAME)
        args.append(residual)

    def store(value, i, j):
        return epilogue.apply(value, residual[i, j] if residual is not None else None).astype(out_dtype)

    return store


def _with_scatter_decode(func: tirx.PrimFunc, stage: DecodeStage, m: int, k: int, num_stored: int) -> tirx.PrimFunc:
    """`func` whose "decode" block (and its loops) is one block building all of W by the stage's tile
    scatter (`schedules/tile_scatter.py`, one thread): a scatter format's definition of its decode."""
    import tvm_ffi
    from tvm.ir import Range
    from tvm.s_tir.stmt import SBlock, SBlockRealize
    from tvm.tirx import BufferRegion

    from tensorpress.schedules.tile_scatter import ScatterRegion, one_thread, scatter_statement

    assert stage.tile_scatter is not None
    stored = list(func.params[1 : 1 + num_stored])  # buffer parameters are Buffers in TVM 0.27
    old: list = []

    def find(block: SBlock) -> SBlock:
        if block.name_hint == "decode":
            old.append(block)
        return block

    tvm_ffi.structural_map(func.body, (SBlock, find))
    (decode,) = old
    out = decode.writes[0].source
    region = ScatterRegion(tirx.const(0, "int32"), tirx.const(0, "int32"), m, k, m, k)
    body, local = scatter_statement(stage.tile_scatter, stored, out, region, one_thread())

    def whole(buffer) -> BufferRegion:
        return BufferRegion(buffer, [Range(0, extent) for extent in buffer.shape])

    block = SBlock([], [whole(b) for b in stored], [whole(out)], "decode", body, alloc_buffers=local)
    realize = SBlockRealize([], tirx.const(True, "bool"), block)

    def replace(stmt):
        if isinstance(stmt, SBlockRealize) and stmt.block.same_as(decode):
            return realize
        if isinstance(stmt, tirx.For) and isinstance(stmt.body, SBlockRealize) and stmt.body.same_as(realize):
            return realize  # the decode's own loops: the scatter walks the tiles itself
        return stmt

    return tvm_ffi.structural_map(func, [(SBlockRealize, replace), (tirx.For, replace)])


# Row slots: tokens padded to a multiple of this in the transposed copy of X, so a schedule may run
# whole vectors of tokens past N (reading zeros) and keep only the first N sums.
SLOT_TOKEN_PAD = 16
ROW_SLOTS_ATTR = "tensorpress.row_slots"  # the stage's block_rows, on a GEMM defined over row slots


def _row_slot_gemm(stage, slots, m, k, x, stored, act_dtype, out_dtype, with_bias, epilogue) -> tirx.PrimFunc:
    """The weight GEMM over the nonzeros of a row-slot stage (`decode_stage.py`, "Row slots"):

    "tokens"  X_t[k, t] = X[t, k] for t < N, 0 up to N rounded up to SLOT_TOKEN_PAD (X transposed)
    "gemm"    acc[n, r] = sum_s f32(X_t[column(r, s), n]) * f32(value(r, s))
              r over whole blocks of block_rows rows (padding rows have zero slots only)
    "store"   Y[n, m] = cast(epilogue(acc[n, m] (+ bias[m])))                 m < M
    """
    rows = x.shape[0]
    num_slots = int(stored[0].shape[1])
    padded_rows = -(-m // slots.block_rows) * slots.block_rows
    padded_tokens = (rows + SLOT_TOKEN_PAD - 1) // SLOT_TOKEN_PAD * SLOT_TOKEN_PAD
    zero = tirx.const(0, act_dtype)
    x_t = te.compute((k, padded_tokens), lambda c, t: tirx.if_then_else(t < rows, x[t, c], zero), name="tokens")
    s = te.reduce_axis((0, num_slots), name="s")
    acc = te.compute(
        (rows, padded_rows),
        lambda i, r: te.sum(
            x_t[slots.column(stored, r, s), i].astype("float32") * slots.value(stored, r, s).astype("float32"),
            axis=s,
        ),
        name="gemm",
    )
    args = [x, *stored]
    if with_bias:
        bias = te.placeholder((m,), act_dtype, name=BIAS_NAME)
        args.append(bias)

    store = _store(epilogue, rows, m, out_dtype, args)

    def stored_value(i, j):
        return store(acc[i, j] + bias[j].astype("float32") if with_bias else acc[i, j], i, j)

    y = te.compute((rows, m), stored_value, name="store")
    func = te.create_prim_func([*args, y])
    _STAGE_OF_FORMAT[stage.name] = stage
    return func.with_attrs(
        {
            **epilogue.attrs(),
            KERNEL_ATTR: KERNEL_NAME,
            FORMAT_ATTR: stage.name,
            ROW_SCALE_ATTR: False,
            ROW_SLOTS_ATTR: slots.block_rows,
            "tensorpress.mk": [m, k],
            "tirx.noalias": True,
            "op_pattern": 8,
        }
    )


def is_weight_gemm(func) -> bool:
    attrs = getattr(func, "attrs", None)
    return attrs is not None and KERNEL_ATTR in attrs and str(attrs[KERNEL_ATTR]) == KERNEL_NAME
