"""The weight GEMM: the one op every weight format compiles to.

    Y[n, m] = sum_k X[n, k] * W[m, k]  (+ bias[m])        X: [N, K], W: [M, K], Y: [N, M]

N (tokens) is symbolic (`n`, int64) so one kernel serves every batch; M and K are the layer's sizes.
W is never an input: a `DecodeStage` says which stored buffers a format keeps (fp16 matrix, FPx bit
planes + scales, Tiled-CSL, ...) and gives the TIR expression of W[m, k] from them. That expression is
the format's one definition of its decode math: the CPU schedule and the Tensor Core template schedule
the same PrimFunc, and tests compare it bit for bit with the format's numpy reference.

Blocks of the PrimFunc (schedules find them by these names):
    "decode"  W_decoded[m, k] = stage.decode(stored..., m, k)       (compute dtype)
    "gemm"    acc[n, m] += f32(X[n, k]) * f32(W_decoded[m, k])       (fp32 accumulation)
    "store"   Y[n, m] = cast(acc[n, m] (+ bias[m]))

The PrimFunc carries attributes that schedule rules match on:
    tensorpress.kernel = "weight_gemm", tensorpress.format = stage.name, tensorpress.mk = [M, K]
    (and tensorpress.n_hint, when the pipeline knows about how many tokens the kernel will see)
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from tvm import te, tirx

KERNEL_ATTR = "tensorpress.kernel"
FORMAT_ATTR = "tensorpress.format"
# Set by the compile pipeline: about how many rows N a kernel will see (N itself stays symbolic), so a
# schedule can choose its token tile (16 for decode steps, larger for prefill and encoders).
N_HINT_ATTR = "tensorpress.n_hint"
# Set by make_weight_gemm: True when the format's per-row factor multiplies Y after the sum over k.
ROW_SCALE_ATTR = "tensorpress.row_scale_in_epilogue"
KERNEL_NAME = "weight_gemm"


@dataclass(frozen=True)
class StoredBuffer:
    """One array a weight format stores for a [M, K] weight (shape and dtype as in the artifact)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


class DecodeStage(abc.ABC):
    """How a weight format turns its stored buffers into W[m, k], written once in TIR.

    Subclasses live in `schedules/<format>_gemm.py` and register under the name of the matching
    packer in `compiler/formats/` (see `register_decode_stage`).
    """

    name: str

    @abc.abstractmethod
    def stored_buffers(self, m: int, k: int) -> list[StoredBuffer]:
        """The buffers this format stores for an [m, k] weight, in the order the kernel takes them."""

    @abc.abstractmethod
    def decode(self, stored: list[te.Tensor], row: tirx.PrimExpr, col: tirx.PrimExpr, dtype: str):
        """TIR expression for W[row, col] in `dtype`, reading only `stored` (same order as above)."""

    def unsupported_reason(self, m: int, k: int) -> str | None:
        """None when the kernel takes an [m, k] weight, else the constraint it breaks (one phrase)."""
        if m % 16 or k % 16:
            return "M and K must be multiples of 16"
        return None


_DECODE_STAGES: dict[str, DecodeStage] = {}


def register_decode_stage(stage: DecodeStage) -> DecodeStage:
    _DECODE_STAGES[stage.name] = stage
    return stage


def get_decode_stage(name: str) -> DecodeStage:
    _import_builtin_stages()
    try:
        return _DECODE_STAGES[name]
    except KeyError:
        known = ", ".join(sorted(_DECODE_STAGES))
        raise KeyError(f"no decode stage named {name!r} (known: {known})") from None


def _import_builtin_stages() -> None:
    # Importing a format's schedule file registers its stage.
    from tensorpress.schedules import dense_gemm, fpx_gemm  # noqa: F401
    from tensorpress.schedules.cpu import dense_panel  # noqa: F401


def make_weight_gemm(
    stage: DecodeStage,
    m: int,
    k: int,
    act_dtype: str = "float16",
    out_dtype: str | None = None,
    with_bias: bool = False,
    n: int | None = None,
    row_scale_in_epilogue: bool = True,
) -> tirx.PrimFunc:
    """Build the weight-GEMM PrimFunc for an [m, k] weight stored as `stage` describes.

    Arguments of the PrimFunc, in order: X [n, k] act_dtype, each stored buffer, bias [m] (if
    with_bias, act_dtype), Y [n, m] out_dtype (default act_dtype). `n=None` makes N symbolic.

    A stage whose W is a per-row factor times an unscaled value (it has `unscaled_decode` and
    `row_scale`, see `tensorcore/decode_hints.RowScaledDecode`) gets, unless row_scale_in_epilogue
    is False, the factor applied once per output in fp32 after the sum:
        "decode"  W_decoded[m, k] = stage.unscaled_decode(stored..., m, k)
        "store"   Y[n, m] = cast(acc[n, m] * row_scale(m) (+ bias[m]))
    Same math, one multiply per output instead of one per weight; only the rounding differs (the
    weights are no longer rounded to the compute dtype after scaling). The PrimFunc then carries the
    attribute tensorpress.row_scale_in_epilogue = True.
    """
    out_dtype = out_dtype or act_dtype
    rows = tirx.Var("n", "int64") if n is None else n
    x = te.placeholder((rows, k), act_dtype, name="X")
    stored = [te.placeholder(b.shape, b.dtype, name=b.name) for b in stage.stored_buffers(m, k)]
    from tensorpress.schedules.tensorcore.decode_hints import RowScaledDecode  # imports this module

    factored = row_scale_in_epilogue and isinstance(stage, RowScaledDecode)
    decode = stage.unscaled_decode if isinstance(stage, RowScaledDecode) and factored else stage.decode
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
        bias = te.placeholder((m,), act_dtype, name="bias")
        args.append(bias)
    y = te.compute((rows, m), lambda i, j: with_bias_added(i, j).astype(out_dtype), name="store")
    func = te.create_prim_func([*args, y])
    return func.with_attrs(
        {
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


def is_weight_gemm(func) -> bool:
    attrs = getattr(func, "attrs", None)
    return attrs is not None and KERNEL_ATTR in attrs and str(attrs[KERNEL_ATTR]) == KERNEL_NAME
