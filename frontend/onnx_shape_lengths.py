"""Give the lengths TVM's ONNX converter leaves as fresh symbolic variables their value, where the graph
computes them from the input shapes.

For a Range (and a Reshape to a computed shape) the converter turns an int64 tensor into a shape and
binds it to a NEW variable, `range_len_0`, by `match_cast(tensor_to_shape(t), R.Shape([range_len_0]))`.
Hugging Face BERT exports build their attention mask from `Range(0, Shape(input_ids)[1], 1)`, so the
mask has shape [range_len_0, ...] where the model means [batch, ...]. Relax then cannot tell those
lengths apart from unrelated ones, and TVM 0.27's memory planning sizes a shared buffer by a length that
is only bound later (VMShapeLower: "has not been computed"). Where `t` is plain integer arithmetic over
shapes (shape_to_tensor, take, reshape, astype, + - * floordiv, max, min, negative, concat, constants),
its value is a PrimExpr over the input shape variables; the new variable is bound to it (simplified with
the input shape variables >= 0). The match_cast stays and checks at run time that the two agree, so a
length this gets wrong fails loudly instead of computing with a wrong shape.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.sym.analyzer import Analyzer, ConstIntBound

_BINARY = {
    "relax.add": lambda a, b: a + b,
    "relax.subtract": lambda a, b: a - b,
    "relax.multiply": lambda a, b: a * b,
    "relax.floor_divide": tirx.floordiv,
    "relax.maximum": tirx.max,
    "relax.minimum": tirx.min,
}


def bind_computed_lengths(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with each function's computable converter lengths bound (module docstring)."""
    updates = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mapping = _computed_lengths(func)
            if mapping:
                updates[gvar] = func.bind_symbolic_vars(mapping)
    if not updates:
        return mod
    functions = dict(mod.functions_items())
    functions.update(updates)
    return tvm.IRModule(functions, attrs=mod.attrs)


def _computed_lengths(func: relax.Function) -> dict[tirx.Var, tirx.PrimExpr]:
    inputs = [v for p in func.params for v in relax.analysis.definable_tir_vars_in_type(p.ty)]
    defined = set(inputs)
    evaluator = _IntegerValues()
    mapping: dict[tirx.Var, tirx.PrimExpr] = {}
    analyzer = Analyzer()
    for var in inputs:
        analyzer.update(var, ConstIntBound(0, ConstIntBound.POS_INF))
    for block in func.body.blocks if isinstance(func.body, relax.SeqExpr) else []:
        for binding in block.bindings:
            evaluator.value_of[binding.var] = binding.value
            if not isinstance(binding, relax.MatchCast):
                continue
            lengths = getattr(binding.ty, "values", None)
            if lengths is None:
                continue
            new = [isinstance(v, tirx.Var) and v not in defined for v in lengths]
            values = evaluator.shape_values(binding.value) if any(new) else None
            if values is not None and len(values) == len(lengths):
                for length, value, is_new in zip(lengths, values, new):
                    if is_new:
                        # bound in the analyzer too: a later length computed from this one is then
                        # written over the input shapes (bind_symbolic_vars does not chain its map)
                        mapping[length] = analyzer.simplify(value)
                        analyzer.bind(length, mapping[length])
            defined.update(v for v in lengths if isinstance(v, tirx.Var))
    return mapping


class _IntegerValues:
    """The elements of small int tensors (rank <= 1) as PrimExprs, where the bindings compute them."""

    def __init__(self) -> None:
        self.value_of: dict[relax.Var, relax.Expr] = {}

    def shape_values(self, expr: relax.Expr) -> list[tirx.PrimExpr] | None:
        """The lengths of a shape made by tensor_to_shape from a computable tensor, else None."""
        expr = self._resolve(expr)
        if isinstance(expr, relax.Call) and _op(expr) == "relax.tensor_to_shape":
            return self.values(expr.args[0])
        return None

    def values(self, expr: relax.Expr) -> list[tirx.PrimExpr] | None:
        expr = self._resolve(expr)
        if isinstance(expr, tvm.ir.Constant):
            data = expr.value.numpy()
            if data.ndim > 1 or not np.issubdtype(data.dtype, np.integer):
                return None
            return [tirx.IntImm("int64", int(x)) for x in data.reshape(-1)]
        if not isinstance(expr, relax.Call):
            return None
        op = _op(expr)
        args = expr.args
        if op == "relax.shape_to_tensor":
            shape = args[0] if isinstance(args[0], relax.ShapeExpr) else self._resolve(args[0])
            lengths = shape.values if isinstance(shape, relax.ShapeExpr) else getattr(args[0].ty, "values", None)
            return [_int64(v) for v in lengths] if lengths is not None else None
        if op == "relax.reshape":
            return self.values(args[0])
        if op == "relax.astype":
            return self.values(args[0]) if _is_int(args[0]) and str(expr.attrs.dtype).startswith("int") else None
        if op == "relax.negative":
            x = self.values(args[0])
            return [-v for v in x] if x is not None else None
        if op in _BINARY:
            a, b = self.values(args[0]), self.values(args[1])
            if a is None or b is None or (len(a) != len(b) and 1 not in (len(a), len(b))):
                return None
            n = max(len(a), len(b))
            a, b = a * n if len(a) == 1 else a, b * n if len(b) == 1 else b
            return [_BINARY[op](x, y) for x, y in zip(a, b)]
        if op == "relax.take":
            data, index = self.values(args[0]), self.values(args[1])
            if data is None or index is None or not all(isinstance(i, tirx.IntImm) for i in index):
                return None
            return [data[int(i) % len(data)] for i in index]  # ONNX Gather: negative indices count from the end
        if op == "relax.concat" and isinstance(args[0], relax.Tuple):
            parts = [self.values(part) for part in args[0].fields]
            return None if any(p is None for p in parts) else [v for p in parts for v in p]  # type: ignore[union-attr]
        return None

    def _resolve(self, expr: relax.Expr) -> relax.Expr:
        seen = 0
        while isinstance(expr, relax.Var) and expr in self.value_of and seen < 64:
            expr, seen = self.value_of[expr], seen + 1
        return expr


def _op(call: relax.Call) -> str | None:
    return call.op.name if isinstance(call.op, tvm.ir.Op) else None


def _is_int(expr: relax.Expr) -> bool:
    return str(getattr(expr.ty, "dtype", "")).startswith("int")


def _int64(value: tirx.PrimExpr) -> tirx.PrimExpr:
    return value if str(value.ty) == "int64" else tirx.Cast("int64", value)
