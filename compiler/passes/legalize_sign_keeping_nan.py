"""LegalizeOps overrides that keep NaN where TVM's own legalisation drops it.

`sign`: topi's is `x < 0 ? -1 : (x > 0 ? 1 : 0)`, ordered compares, so sign(NaN) = 0; torch and
onnxruntime give NaN. (Min/max based ops are handled after lowering, by PropagateNaN.)
"""

from __future__ import annotations

from tvm import relax, te, tirx, topi


def _sign_keeping_nan(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    x = call.args[0]
    if not str(x.ty.dtype).startswith(("float", "bfloat")):
        return bb.call_te(topi.sign, x)

    def compute(data: te.Tensor) -> te.Tensor:
        def element(*index):
            v = data(*index)
            dtype = str(v.ty.dtype)
            one, zero = tirx.const(1, dtype), tirx.const(0, dtype)
            sign = tirx.Select(v < zero, -one, tirx.Select(v > zero, one, zero))
            return tirx.Select(tirx.isnan(v), v, sign)

        return te.compute(data.shape, element, name="T_sign")

    return bb.call_te(compute, x, primfunc_name_hint="sign")


# For `relax.transform.LegalizeOps(LEGALIZE_KEEPING_NAN)`.
LEGALIZE_KEEPING_NAN = {"relax.sign": _sign_keeping_nan}
