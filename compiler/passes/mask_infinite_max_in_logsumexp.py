"""MaskInfiniteMaxInLogSumExp: logsumexp over a row holding ±Inf gives ±Inf (as torch and onnxruntime),
not NaN.

The ONNX frontend writes ReduceLogSumExp as the stable form

    m = max(x, axes, keepdims=True);  log(sum(exp(x - m), axes)) + m

where a row whose max is +Inf (or a row of -Inf) computes inf - inf = NaN. torch.logsumexp replaces an
infinite max by 0 first; so does this pass:

    m' = where(isinf(m), 0, m);       log(sum(exp(x - m'), axes)) + m'

A row holding NaN still gives NaN (max is NaN, see PropagateNaN); finite rows are unchanged.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from tensorpress.imported_model import ImportedModel


def _pattern():
    x = wildcard()
    row_max = is_op("relax.max")(x)
    row_sum = is_op("relax.sum")(is_op("relax.exp")(is_op("relax.subtract")(x, row_max)))
    out = is_op("relax.add")(is_op("relax.log")(row_sum), row_max)
    return out, x, row_max, row_sum


def mask_infinite_max_in_logsumexp(model: ImportedModel) -> ImportedModel:
    out, x, row_max, row_sum = _pattern()

    def rewrite(_expr, matches):
        m = matches[row_max]
        masked = relax.op.where(relax.op.isinf(m), relax.op.zeros_like(m), m)
        attrs = matches[row_sum].attrs
        total = relax.op.sum(relax.op.exp(relax.op.subtract(matches[x], masked)), attrs.axis, attrs.keepdims)
        return relax.op.add(relax.op.log(total), masked)

    mod = model.mod.clone()  # passes are pure: the input module stays as it was
    for gvar, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gvar] = rewrite_call(out, rewrite, func)
    return model.with_module(mod)
