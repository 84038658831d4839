"""ConvolutionsAsWeightGemms (CPU): every ordinary 2-D convolution becomes a linear layer over patches.

A batch-1 CNN spends its time in convolutions, and the CPU's fast kernel is the weight GEMM
(`schedules/cpu/register_blocked_gemm.py`, ~50-65 GFLOP/s on one AVX2 core), not TVM's generic conv
loop nest (~5-25 GFLOP/s). So the graph is moved to channels-last once, and each conv2d with
groups = 1 is rewritten into a linear layer that `RewriteLinearToWeightGemm` then takes like any other:

    NCHW graph ──ConvertLayout──▶ NHWC graph (one transpose at the input, one where NCHW is needed again)

    conv2d(x [N,H,W,C], W [O,C,KH,KW]) + b           ──▶  reshape(matmul(P, permute_dims(W2)) + b, [N,OH,OW,O])
        1x1, stride 1, no padding:  P = reshape(x, [N*H*W, C])                       (a view: no copy)
        1x1, stride s, no padding:  P = reshape(x[:, ::s, ::s, :], [N*OH*OW, C])
        otherwise:                  P = im2col(x) [N*OH*OW, KH*KW*C]                  (zero padded, dilated)
    W2 = W as [O, KH*KW*C] (OHWI order, matching P's columns), stored in place of W under its name.

Channels-last makes a pixel's C channels contiguous, so a 1x1 conv needs no copy at all and im2col copies
whole channel vectors. Grouped and depthwise convs stay convs (in NHWC). Only for llvm targets: the
Tensor Core path is not measured on convs yet.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax import PyExprMutator, expr_functor

from tensorpress.frontend.relax_params import split_params
from tensorpress.imported_model import ImportedModel

_CONV = "relax.nn.conv2d"


def convolutions_as_weight_gemms(model: ImportedModel) -> ImportedModel:
    """The model with its groups = 1 convs as linear layers over patches (module docstring)."""
    if not _has_conv(model.mod):
        return model
    mod = relax.transform.ConvertLayout({_CONV: ["NHWC", "OHWI"]})(_clamps_as_relax_ops(model.mod))
    mutator = _ConvToLinear(mod, model.params)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.rewrite_function(func))
    mod = relax.transform.DeadCodeElimination()(mutator.builder_.get())
    params = {**model.params, **mutator.new_params}
    return model.with_module(mod, params)


def _clamps_as_relax_ops(mod: tvm.IRModule) -> tvm.IRModule:
    """call_tir(max or min of a tensor and a scalar) -> relax.maximum / minimum. TVM's ONNX importer emits
    Clip (ReLU6) as such TIR calls, which ConvertLayout cannot see through: each would get a transpose
    to NCHW and back around it. The Relax ops legalise to the same TOPI kernels."""
    clamps = {gvar: kind for gvar, func in mod.functions_items() if (kind := _scalar_clamp(func)) is not None}
    if not clamps:
        return mod

    @expr_functor.mutator
    class ClampsAsOps(PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if call.op.same_as(tvm.ir.Op.get("relax.call_tir")) and call.args[0] in clamps:
                x, scalar = call.args[1].fields
                if x.ty.ndim >= 1 and scalar.ty.ndim == 0:
                    return getattr(relax.op, clamps[call.args[0]])(x, scalar)
            return call

    mutator = ClampsAsOps(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return relax.transform.DeadCodeElimination()(mutator.builder_.get())


def _scalar_clamp(func) -> str | None:
    """ "maximum" / "minimum" when `func` is one block out[i...] = max / min(a[i...], b[()]), else None."""
    from tvm import s_tir

    if not isinstance(func, tirx.PrimFunc) or len(func.params) != 3:
        return None
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root")) if func.body is not None else []
    if len(blocks) != 1:
        return None
    block = sch.get(blocks[0])
    store = block.body
    if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, (tirx.Max, tirx.Min)):
        return None
    tensor, scalar = store.value.a, store.value.b
    if not (isinstance(tensor, tvm.ir.TensorLoad) and isinstance(scalar, tvm.ir.TensorLoad)) or scalar.indices:
        return None
    iter_vars = [iv.var for iv in block.iter_vars]
    if len(tensor.indices) != len(iter_vars) or not all(i.same_as(v) for i, v in zip(tensor.indices, iter_vars)):
        return None
    return "maximum" if isinstance(store.value, tirx.Max) else "minimum"


def _has_conv(mod: tvm.IRModule) -> bool:
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == _CONV:
            found.append(expr)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return bool(found)


def _ints(values) -> list[int]:
    return [int(v) for v in values]


@expr_functor.mutator
class _ConvToLinear(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, params: dict[str, np.ndarray]):
        super().__init__(mod)
        self.params = params
        self.new_params: dict[str, np.ndarray] = {}
        self.weights_2d: dict[relax.Var, relax.Var] = {}  # the 4-D parameter -> its [O, KH*KW*C] stand-in
        self.candidates: set[relax.Var] = set()  # the function's parameters that may be replaced

    def rewrite_function(self, func: relax.Function) -> relax.Function:
        self.weights_2d = {}
        self.candidates = _convertible_weights(func, split_params(func)[1])
        body = self.visit_expr(func)
        params = [self.weights_2d.get(p, p) for p in func.params]
        return relax.Function(params, body.body, body.ret_ty, body.is_pure, body.attrs)

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call
        rewritten = None
        if call.op.name == _CONV:
            rewritten = self._conv(call)
        elif call.op.name == "relax.add":
            rewritten = self._bias(call)
        return call if rewritten is None else rewritten

    def _producer(self, expr, op_name: str):
        """The call binding `expr` if it is a call of `op_name`, else None."""
        if not isinstance(expr, relax.Var):
            return None
        bound = self.lookup_binding(expr)
        if isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op) and bound.op.name == op_name:
            return bound
        return None

    def _conv(self, call) -> relax.Expr | None:
        attrs = call.attrs
        if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NHWC", "OHWI", "NHWC"):
            return None
        if int(attrs.groups) != 1 or attrs.out_dtype not in (None, "", call.args[0].ty.dtype):
            return None
        permuted = self._producer(call.args[1], "relax.permute_dims")
        if permuted is None or permuted.args[0] not in self.candidates:
            return None
        if _ints(permuted.attrs.axes) != [0, 2, 3, 1]:
            return None
        x, weight = call.args[0], permuted.args[0]
        shapes = [x.ty.shape.values[1:], call.ty.shape.values[1:]]  # the batch may be symbolic
        if any(not isinstance(d, tirx.IntImm) for s in shapes for d in s):
            return None
        n = x.ty.shape.values[0]
        h, w, c = _ints(x.ty.shape.values[1:])
        oh, ow, o = _ints(call.ty.shape.values[1:])
        kh, kw = _ints(weight.ty.shape.values)[2:]
        stride, padding, dilation = _ints(attrs.strides), _ints(attrs.padding), _ints(attrs.dilation)
        if (kh, kw) == (1, 1) and padding == [0, 0, 0, 0]:
            if stride != [1, 1]:
                x = self.builder_.emit(relax.op.strided_slice(x, axes=[1, 2], begin=[0, 0], end=[h, w], strides=stride))
            patches = self.builder_.emit(relax.op.reshape(x, [n * oh * ow, c]))
        else:
            im2col = _im2col((h, w), c, (kh, kw), stride, padding, dilation, (oh, ow), x.ty.dtype)
            gvar = self.builder_.add_func(im2col, f"im2col_{h}x{w}x{c}_k{kh}x{kw}_s{stride[0]}x{stride[1]}")
            out = relax.TensorType([n * oh * ow, kh * kw * c], x.ty.dtype)
            patches = self.builder_.emit(relax.call_tir(gvar, [x], out))
        w2 = self._weight_2d(weight, o, kh * kw * c)
        product = self.builder_.emit(relax.op.matmul(patches, relax.op.permute_dims(w2)))
        return relax.op.reshape(product, [n, oh, ow, o])

    def _weight_2d(self, weight: relax.Var, rows: int, cols: int) -> relax.Var:
        if weight not in self.weights_2d:
            value = np.asarray(self.params[weight.name])
            self.new_params[weight.name] = np.ascontiguousarray(value.transpose(0, 2, 3, 1).reshape(rows, cols))
            self.weights_2d[weight] = relax.Var(weight.name, relax.TensorType([rows, cols], weight.ty.dtype))
        return self.weights_2d[weight]

    def _bias(self, call) -> relax.Expr | None:
        """add(reshape(matmul(P, W2^T)), bias as [1,1,1,O]) -> reshape(add(matmul(P, W2^T), bias)): the
        linear layer's own bias, so the weight GEMM adds it in its epilogue."""
        out = self._producer(call.args[0], "relax.reshape")
        product = self._producer(out.args[0], "relax.matmul") if out is not None else None
        if product is None:
            return None
        weight_t = product.args[1]
        if isinstance(weight_t, relax.Var):
            weight_t = self._producer(weight_t, "relax.permute_dims")
        if weight_t is None or not any(weight_t.args[0].same_as(w) for w in self.weights_2d.values()):
            return None
        bias = self._bias_parameter(call.args[1], int(weight_t.args[0].ty.shape.values[0]))
        if bias is None:
            return None
        return relax.op.reshape(self.builder_.emit(relax.op.add(out.args[0], bias)), out.args[1])

    def _bias_parameter(self, expr, channels: int) -> relax.Var | None:
        """The 1-D [channels] parameter behind permute_dims(reshape(b, [1, O, 1, 1])) or reshape(b, ...)."""
        permuted = self._producer(expr, "relax.permute_dims")
        inner = permuted.args[0] if permuted is not None else expr
        reshaped = self._producer(inner, "relax.reshape")
        if reshaped is None:
            return None
        b = reshaped.args[0]
        if not isinstance(b, relax.Var) or b.name not in self.params or b.ty.ndim != 1:
            return None
        if _ints(b.ty.shape.values) != [channels] or _ints(expr.ty.shape.values) != [1, 1, 1, channels]:
            return None
        return b


def _convertible_weights(func: relax.Function, weight_params: list[relax.Var]) -> set[relax.Var]:
    """The 4-D weight parameters whose every use is one permute_dims to OHWI (so they can be replaced)."""
    weights = [p for p in weight_params if isinstance(p.ty, relax.TensorType) and p.ty.ndim == 4]
    uses: dict[relax.Var, list] = {w: [] for w in weights}

    def visit(expr):
        if isinstance(expr, relax.Call):
            for arg in expr.args:
                if arg in uses:
                    uses[arg].append(expr)

    relax.analysis.post_order_visit(func.body, visit)
    return {
        w
        for w, calls in uses.items()
        if calls
        and all(isinstance(c.op, tvm.ir.Op) and c.op.name == "relax.permute_dims" for c in calls)
        and all(_ints(c.attrs.axes) == [0, 2, 3, 1] for c in calls)
    }


def _im2col(hw: tuple, c: int, kernel: tuple, stride, padding, dilation, out_hw: tuple, dtype: str):
    """cols[N*OH*OW, KH*KW*C] (N symbolic: one kernel for every batch): row (b, i, j) holds the patch
    under output pixel (i, j) of image b, zeros outside x [N, H, W, C]. Written as a 6-deep nest with the
    channel loop innermost, so the padding test never depends on the vector lane and each patch row is a
    run of whole channel vectors."""
    from tvm.script import tirx as T

    (h, w), (kh, kw), (oh, ow) = hw, kernel, out_hw
    (sh, sw), (top, left), (dh, dw) = stride, padding[:2], dilation

    @T.prim_func(private=True, s_tir=True)
    def im2col(var_x: T.handle, var_cols: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(var_x, (n, h, w, c), dtype)
        cols = T.match_buffer(var_cols, (n * oh * ow, kh * kw * c), dtype)
        for b, i, j, a, e, ch in T.grid(n, oh, ow, kh, kw, c):
            with T.sblock("im2col"):
                vb, vi, vj, va, ve, vc = T.axis.remap("SSSSSS", [b, i, j, a, e, ch])
                cols[(vb * oh + vi) * ow + vj, (va * kw + ve) * c + vc] = T.if_then_else(
                    vi * sh - top + va * dh >= 0
                    and vi * sh - top + va * dh < h
                    and vj * sw - left + ve * dw >= 0
                    and vj * sw - left + ve * dw < w,
                    x[vb, T.max(vi * sh - top + va * dh, 0), T.max(vj * sw - left + ve * dw, 0), vc],
                    T.cast(0, dtype),
                )

    return im2col
