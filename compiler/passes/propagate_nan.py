"""PropagateNaN: float min/max that return NaN when either operand is NaN, as onnxruntime and torch do.

TVM lowers `T.max(a, b)` to `a > b ? a : b` on LLVM (an ordered compare: a NaN `a` gives `b`) and to
`fmaxf(a, b)` on CUDA (which returns the operand that is not NaN). Every ReLU (`max(x, 0)`), clip,
`maximum`/`minimum`, max/min reduction and the clamps inside the fast exp/tanh/erf polynomials is such
a max or min, so a NaN in the input turned into a finite number (ReLU(NaN) = 0) where the reference
propagates it. This pass rewrites each float min/max into

    max(a, b)  ->  select(isnan(a) || isnan(b), a + b, max(a, b))      (a + b is NaN when one is)
    max(a, c)  ->  select(isnan(a), a, max(a, c))                     (c a constant, not NaN)

±Inf need nothing: ordered compares already order them. It runs on lowered TIR, after schedules,
cross-thread reductions and CSE, so every max/min of every kernel is covered (our schedules, dlight's,
the reduction combiners of warp shuffles) and no schedule sees a reducer it cannot recognise.

A NaN that a clamp now keeps can reach a float -> int conversion (the fast exp computes its power of
two as int32(floor(clamp(x) * log2(e)))); LLVM makes such a conversion poison, so each float -> int
cast gets `isnan(v) ? 0 : v` (the fast exp's result is then NaN through its final `max(·, x)`).

Cost: one unordered compare, an add and a blend per min/max (a compare and a blend where one side is
a constant); these ops are memory-bound on the CPU.
"""

from __future__ import annotations

import math

import tvm_ffi
from tvm import tirx


def _dtype(expr: tirx.PrimExpr) -> str:
    return str(expr.ty.dtype)


def _is_number(expr: tirx.PrimExpr) -> bool:
    """A constant (or a broadcast constant) that is not NaN: isnan of it is always false."""
    if isinstance(expr, tirx.Broadcast):
        expr = expr.value
    return isinstance(expr, tirx.FloatImm) and not math.isnan(expr.value)


def _nan_propagating(op, a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
    plain = op(a, b)
    if _is_number(b):
        return tirx.Select(tirx.isnan(a), a, plain)
    if _is_number(a):
        return tirx.Select(tirx.isnan(b), b, plain)
    either_nan = tirx.Or(tirx.isnan(a), tirx.isnan(b))
    return tirx.Select(either_nan, tirx.Add(a, b), plain)


def _rewrite_max(node: tirx.Max) -> tirx.PrimExpr:
    return _nan_propagating(tirx.Max, node.a, node.b) if _is_float_dtype(_dtype(node)) else node


def _rewrite_min(node: tirx.Min) -> tirx.PrimExpr:
    return _nan_propagating(tirx.Min, node.a, node.b) if _is_float_dtype(_dtype(node)) else node


def _rewrite_cast(node: tirx.Cast) -> tirx.PrimExpr:
    to, value = _dtype(node), node.value
    if not to.startswith(("int", "uint")) or not _is_float_dtype(_dtype(value)):
        return node
    zero = tirx.const(0.0, _dtype(value).split("x")[0])
    lanes = _lanes(_dtype(value))
    if lanes > 1:
        zero = tirx.Broadcast(zero, lanes)
    return tirx.Cast(to, tirx.Select(tirx.isnan(value), zero, value))


def _is_float_dtype(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


def _lanes(dtype: str) -> int:
    return int(dtype.split("x")[1]) if "x" in dtype else 1


@tirx.transform.prim_func_pass(opt_level=0, name="tensorpress.PropagateNaN")
def propagate_nan(func: tirx.PrimFunc, _mod, _ctx) -> tirx.PrimFunc:
    """Rewrite every float min/max of `func` to propagate NaN, and guard float -> int casts."""
    return tvm_ffi.structural_map(
        func, [(tirx.Max, _rewrite_max), (tirx.Min, _rewrite_min), (tirx.Cast, _rewrite_cast)]
    )
