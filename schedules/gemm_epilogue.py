"""What the weight GEMM's "store" stage does to each sum besides the row scale and bias: an activation
and a residual connection, computed where the sum is (in registers), not by kernels of their own.

    Y[n, m] = cast( activation(acc[n, m] · row_scale(m) + bias[m]) + residual[n, m] )

    activation  None, or "gelu": v · (0.5 + 0.5 · erf(v / √2)), erf as TVM's fast polynomial
                (`topi.fast_erf`), the same erf the CPU pipeline gives an unfused GELU (DecomposeGelu,
                then FastMathTransform), so fusing changes no number
    residual    whether another [N, M] tensor (the layer's output dtype) is added last

The PrimFunc carries it as attributes (EPILOGUE_ACTIVATION_ATTR, EPILOGUE_RESIDUAL_ATTR) and takes the
residual as the argument just before Y (named "residual"), so a schedule that writes the store itself
(the one-token row-slot gather) reads it back with `epilogue_of`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ACTIVATIONS = ("gelu",)
EPILOGUE_ACTIVATION_ATTR = "tensorpress.epilogue_activation"  # "" for none
EPILOGUE_RESIDUAL_ATTR = "tensorpress.epilogue_residual"
RESIDUAL_NAME = "residual"  # the residual argument's buffer name


@dataclass(frozen=True)
class GemmEpilogue:
    """An activation (None or one of ACTIVATIONS) and whether a residual tensor is added after it."""

    activation: str | None = None
    residual: bool = False

    def __post_init__(self):
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown epilogue activation {self.activation!r}; one of {', '.join(ACTIVATIONS)}")

    @property
    def empty(self) -> bool:
        return self.activation is None and not self.residual

    def name_suffix(self) -> str:
        """What a kernel's name gains: '_gelu', '_residual', '_gelu_residual' or ''."""
        return (f"_{self.activation}" if self.activation else "") + ("_residual" if self.residual else "")

    def apply(self, value, residual=None):
        """The epilogue of one fp32 sum `value` (after row scale and bias); `residual`: the residual's
        element (any float dtype), given exactly when self.residual."""
        if (residual is not None) != self.residual:
            raise ValueError("a residual element is given exactly when the epilogue adds one")
        if self.activation == "gelu":
            value = _gelu_fast_erf(value)
        return value + residual.astype("float32") if residual is not None else value

    def attrs(self) -> dict[str, object]:
        """The PrimFunc attributes that carry it (none for the empty epilogue: `epilogue_of` reads that back)."""
        if self.empty:
            return {}
        return {EPILOGUE_ACTIVATION_ATTR: self.activation or "", EPILOGUE_RESIDUAL_ATTR: self.residual}


def epilogue_of(func) -> GemmEpilogue:
    """The epilogue a weight-GEMM PrimFunc was made with (none when it carries no epilogue attributes)."""
    attrs = func.attrs
    if attrs is None or EPILOGUE_ACTIVATION_ATTR not in attrs:
        return GemmEpilogue()
    return GemmEpilogue(str(attrs[EPILOGUE_ACTIVATION_ATTR]) or None, bool(attrs[EPILOGUE_RESIDUAL_ATTR]))


def _gelu_fast_erf(value):
    """v · (0.5 + 0.5 · fast_erf(v · (1/√2))) in float32, operations in DecomposeGelu's order."""
    from tvm import tirx

    half = tirx.const(0.5, "float32")
    erf = fast_erf(value * tirx.const(1 / math.sqrt(2), "float32"))
    return value * (half + erf * half)


def fast_erf(x):
    """TVM's fast float32 erf polynomial (`topi.fast_erf`, what FastMathTransform puts in place of erf)
    as an expression of the scalar `x`: topi's own compute body, its tensor load replaced by `x`."""
    import tvm_ffi
    from tvm import te, topi
    from tvm.ir import Call

    probe = te.placeholder((1,), "float32", name="probe")
    body = topi.fast_erf(probe).op.body[0]

    def load_to_x(call: Call):
        return x if getattr(call.op, "name", None) == "te.tensor_load" else call

    return tvm_ffi.structural_map(body, (Call, load_to_x))
