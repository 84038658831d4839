"""DecomposeGelu: gelu(x) -> x * (0.5 + 0.5 * erf(x / sqrt(2))) as Relax ops.

Written out, its erf is a Relax op that FastMathTransform can replace with TVM's fast polynomial
(`topi.fast_erf`); legalised whole, gelu's erf compiles to a scalar libm call per element. On the CPU
that is 13 ms against 0.3 ms for MiniLM's gelu at 2x32 tokens, for a model error that stays at 5e-6.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor

from tensorpress.imported_model import ImportedModel


@expr_functor.mutator
class _GeluToErf(PyExprMutator):
    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.gelu":
            x = call.args[0]
            dtype = x.ty.dtype
            erf = self.builder_.emit(relax.op.erf(relax.op.multiply(x, relax.const(1 / math.sqrt(2), dtype))))
            half = relax.const(0.5, dtype)
            return relax.op.multiply(x, relax.op.add(half, relax.op.multiply(erf, half)))
        return call


def decompose_gelu(model: ImportedModel) -> ImportedModel:
    mutator = _GeluToErf(model.mod)
    for gvar, func in model.mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return model.with_module(mutator.builder_.get())
