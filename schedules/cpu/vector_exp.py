"""exp(x) for float32 as TIR arithmetic, so that a vectorised loop computes it in vector registers.

TVM lowers `tirx.exp` on llvm to a call of libm's `expf` per element, even inside a vectorised loop;
`vector_exp` is Cephes' expf written as TIR (Cody-Waite range reduction, degree-7 polynomial), which the
vectoriser turns into AVX2 arithmetic:

    n = floor(x·log2(e) + 1/2)                  x clamped to [-104, 88.72]: e^x below 2^-150 rounds to 0
    r = x - n·C1 - n·C2                        C1 + C2 = ln 2, C1 exact in 9 bits so n·C1 is exact
    e^r = 1 + r + r²·P(r)                      |r| <= ln2 / 2, P Cephes' degree-5 minimax polynomial
    e^x = e^r · 2^(n // 2) · 2^(n - n // 2)    two powers of two: each a normal float for n in [-150, 128],
                                               so results in the subnormal range round once, correctly

Error: 0.99 ulp at most of the exact value over 2^20 points evenly spread over the normal results and 2^20
softmax-like negatives (numpy's float64 exp as reference; `tests/schedules/cpu/test_vector_exp.py` holds it
to 2 ulp); subnormal results (x < -87.34) are within one subnormal step. x > 88.72 gives +inf, -inf
gives 0, NaN gives NaN, as libm does.
"""

from __future__ import annotations

import tvm_ffi
from tvm import tirx
from tvm.ir import Call

LOG2E = 1.44269504088896341
C1 = 0.693359375  # ln 2 = C1 + C2; C1 has 9 significant bits, so n·C1 is exact for |n| < 2^15
C2 = -2.12194440e-4
POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
LOWEST = -104.0  # e^-104 < 2^-150: rounds to 0
HIGHEST = 88.72283935546875  # the largest float32 whose exp is finite
_EXP = "tirx.exp"


def vector_exp(x: tirx.PrimExpr, nan_select: bool = True, at_most_zero: bool = False) -> tirx.PrimExpr:
    """e^x of a float32 expression, as arithmetic that vectorises (see the module docstring).

    nan_select=False leaves out the final `isnan(x) ? x : ...`: NaN then stays NaN only through the
    build's PropagateNaN (the clamps' min/max keep it, the int cast is guarded), which every build runs.
    TVM 0.27's vectoriser cannot vectorise `isnan` and runs the whole loop scalar where it appears.
    at_most_zero: x is known to be <= 0 or NaN (softmax's s - max): no upper clamp, no +inf case."""
    if str(x.ty) != "float32":
        raise ValueError(f"vector_exp computes float32 only, got {x.ty}")
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    i32 = lambda v: tirx.const(v, "int32")  # noqa: E731
    if at_most_zero:  # a select, not max: it keeps NaN without PropagateNaN's checks
        clamped = tirx.Select(x < f32(LOWEST), f32(LOWEST), x)
    else:
        clamped = tirx.max(tirx.min(x, f32(HIGHEST)), f32(LOWEST))
    n = tirx.floor(clamped * f32(LOG2E) + f32(0.5))
    r = clamped - n * f32(C1) - n * f32(C2)
    poly = f32(POLY[0])
    for c in POLY[1:]:
        poly = poly * r + f32(c)
    exp_r = poly * (r * r) + r + f32(1.0)
    k = tirx.Cast("int32", n)
    half = tirx.shift_right(k, i32(1))  # floor(k / 2), also for negative k
    power = lambda e: tirx.reinterpret("float32", tirx.shift_left(e + i32(127), i32(23)))  # noqa: E731
    value = exp_r * power(half) * power(k - half)
    if not at_most_zero:
        value = tirx.Select(x > f32(HIGHEST), f32(float("inf")), value)
    if not nan_select:
        return value
    return tirx.Select(tirx.isnan(x), x, value)  # NaN stays NaN (the clamp's min/max would drop it)


def with_vector_exp(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """`func` with every float32 `exp` call replaced by `vector_exp` of its argument."""

    def replace(call: Call):
        if getattr(call.op, "name", None) == _EXP and str(call.ty) == "float32":
            return vector_exp(call.args[0])
        return call

    return func.with_body(tvm_ffi.structural_map(func.body, (Call, replace)))
