"""FuseEncoderAttention: an encoder's self-attention ops -> one call of the encoder attention kernel.

The frontends give BERT-style attention (Hugging Face's, torch's scaled_dot_product_attention export,
a plain `softmax(q @ kᵀ * c) @ v`) as a chain of Relax ops over [B, H, S, D] heads:

    q4 = permute_dims(q, [0, 2, 1, 3])                 q: [B, S, H, D] (a reshape of the q linear's output)
    kT = permute_dims(k4, [0, 1, 3, 2])  or  permute_dims(k, [0, 2, 3, 1])
    s  = matmul(q4 · c_q, kT · c_k) · c_s               each scale optional (multiply or divide by a scalar)
    x  = s + mask                                      optional; mask broadcast to [B, H, S, S]
    p  = softmax(x, axis=-1)
    p  = where(not any(x != -inf), 0, p)               optional: torch's export of fully masked rows, or
    p  = where(isnan(p), 0, p)                         the ONNX export's Where(IsNaN(p), 0, p) of it
    o  = matmul(p, v4)                                 v4 = permute_dims(v, [0, 2, 1, 3])

with reshapes to [B·H, S, ·] and same-shape broadcast_to's between them (torch's bmm). Such a chain
becomes `permute_dims(call_tir(encoder_attention, [q, k, v(, mask)]), [0, 2, 1, 3])`: the kernel reads q,
k, v where the heads are split off (or, when they are the three parts of one split of the stacked q/k/v
linear's output, that output in place) and writes [B, S, H, D]; the transposes after it that only undo
its permute_dims (and a reshape to their own shape between them, as ONNX imports have) fold away.
Anything else is left as it is: other scales or mask shapes, cross attention (queries and keys of
different lengths), a head_dim that is not a multiple of 8, other dtypes than float32, a guard of another
form (isnan of the scores, another value than 0, a cast between isnan and where). The kernel computes
what the chain computes, NaN and fully masked rows included (`schedules/encoder_attention.py`): the two
guards are its two modes, zero_masked_rows (p = 0 where every score is -inf, NaN kept) and zero_nan_rows
(p = 0 wherever softmax gives NaN, also from NaN in q, k or the mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax import PyExprMutator, expr_functor
from tvm.sym.analyzer import Analyzer

from tensorpress.compiler.passes import binding_readers
from tensorpress.frontend.relax_params import is_model_function
from tensorpress.imported_model import ImportedModel
from tensorpress.schedules.encoder_attention import EncoderAttention, encoder_attention_func

HEAD_DIM_MULTIPLE = 8  # the CPU kernel's vectors of channels


def fuse_encoder_attention(model: ImportedModel) -> ImportedModel:
    """`model` with every attention chain of the module docstring's form as one kernel call."""
    per_function = {}
    for gvar, func in model.mod.functions_items():
        if isinstance(func, relax.Function) and is_model_function(func):
            sites = find_attention_sites(func)
            if sites:
                per_function[gvar] = sites
    if not per_function:
        return model
    mutator = _AttentionFuser(model.mod)
    for gvar, sites in per_function.items():
        mutator.builder_.update_func(gvar, mutator.rewrite(model.mod[gvar], sites))
    return model.with_module(relax.transform.DeadCodeElimination()(mutator.builder_.get()))


@dataclass(frozen=True)
class AttentionSite:
    """One chain found: the var bound to its [B, H, S, D] result, the kernel's config and arguments."""

    result: relax.Var
    config: EncoderAttention
    q: relax.Expr  # [B, S, H, D], or the stacked [B·S or B, S, 3·H·D] output when config.stacked_qkv
    k: relax.Expr | None
    v: relax.Expr | None
    mask: relax.Expr | None
    batch: tirx.PrimExpr
    seq: tirx.PrimExpr


def find_attention_sites(func: relax.Function) -> list[AttentionSite]:
    """The attention chains of `func` (module docstring), in binding order."""
    finder = _Finder(func)
    sites = []
    for block in func.body.blocks:
        for binding in block.bindings:
            site = finder.site_at(binding.var)
            if site is not None:
                sites.append(site)
    return sites


class _Finder:
    def __init__(self, func: relax.Function):
        self.var2val = relax.analysis.get_var2val(func)
        self.readers = binding_readers(func)
        self.analyzer = Analyzer()

    # -- small helpers over the bindings ----------------------------------------------------------------
    def call(self, expr, op: str) -> relax.Call | None:
        value = self.var2val.get(expr) if isinstance(expr, relax.Var) else expr
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == op:
            return value
        return None

    def same(self, a, b) -> bool:
        return self.analyzer.can_prove_equal(a, b)

    def shape(self, expr) -> list | None:
        ty = expr.ty
        if not isinstance(ty, relax.TensorType) or ty.shape is None or not hasattr(ty.shape, "values"):
            return None
        return list(ty.shape.values)

    def walk_views(self, expr) -> relax.Expr | None:
        """The tensor behind reshapes that merge a 4-D shape's two leading axes (or split them back) and
        broadcast_to's of a tensor to its own shape (None: an expression without a known shape)."""
        while True:
            shape = self.shape(expr)
            if shape is None:
                return None
            broadcast = self.call(expr, "relax.broadcast_to")
            if broadcast is not None and self._same_shape(self.shape(broadcast.args[0]), shape):
                expr = broadcast.args[0]
                continue
            reshape = self.call(expr, "relax.reshape")
            if reshape is not None and self._merges_leading(self.shape(reshape.args[0]), shape):
                expr = reshape.args[0]
                continue
            return expr

    def views_to_4d(self, expr) -> relax.Expr | None:
        """`walk_views(expr)` when it is 4-D, else None."""
        inner = self.walk_views(expr)
        return inner if inner is not None and len(self.shape(inner) or []) == 4 else None

    def _same_shape(self, a, b) -> bool:
        return a is not None and b is not None and len(a) == len(b) and all(self.same(x, y) for x, y in zip(a, b))

    def _merges_leading(self, src, dst) -> bool:
        """Whether reshape(src -> dst) only merges or splits the two leading axes of a 4-D shape."""
        if src is None or dst is None or sorted((len(src), len(dst))) not in ([3, 4], [4, 4]):
            return False
        if len(src) == len(dst):
            return self._same_shape(src, dst)
        four, three = (src, dst) if len(src) == 4 else (dst, src)
        return self.same(four[0] * four[1], three[0]) and self._same_shape(four[2:], three[1:])

    def scaled(self, expr) -> tuple[relax.Expr, float]:
        """(x, c) for multiply(x, c), multiply(c, x) or divide(x, 1/c) with c a float32 scalar constant;
        (expr, 1) otherwise."""
        for op in ("relax.multiply", "relax.divide"):
            call = self.call(expr, op)
            if call is None:
                continue
            for x, c in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
                value = _scalar(c)
                if value is not None and (op == "relax.multiply" or x.same_as(call.args[0])):
                    return x, value if op == "relax.multiply" else 1.0 / value
        return expr, 1.0

    def heads_split(self, expr, axes: list[int]) -> relax.Expr | None:
        """t for expr = permute_dims(t, axes), t [B, S, H, D]."""
        call = self.call(expr, "relax.permute_dims")
        if call is None or _axes(call, 4) != axes:
            return None
        return call.args[0]

    # -- the chain ---------------------------------------------------------------------------------------
    def site_at(self, var: relax.Var) -> AttentionSite | None:
        pv = self.call(var, "relax.matmul")
        if pv is None or not _float32(var):
            return None
        result = var
        if len(self.shape(var) or []) == 3:  # the 3-D bmm: its one reader reshapes it back to 4-D heads
            reshape = next(
                (
                    v
                    for v, value in self.var2val.items()
                    if isinstance(value, relax.Call)
                    and getattr(value.op, "name", "") == "relax.reshape"
                    and value.args[0].same_as(var)
                ),
                None,
            )
            if reshape is None or len(self.readers.get(var, [])) != 1:
                return None
            if not self._merges_leading(self.shape(var), self.shape(reshape)):
                return None
            result = reshape
        elif len(self.shape(var) or []) != 4:
            return None
        p = self.views_to_4d(pv.args[0])
        v4 = self.views_to_4d(pv.args[1])
        if p is None or v4 is None:
            return None
        guard = None
        softmax = self.call(p, "relax.nn.softmax")
        if softmax is None:
            where = self.call(p, "relax.where")
            if where is None:
                return None
            softmax = self.call(where.args[2], "relax.nn.softmax")
            if softmax is None:
                return None
            if self._zeroes_all_masked_rows(where, softmax):
                guard = "zero_masked_rows"
            elif self._zeroes_nan(where):
                guard = "zero_nan_rows"
            else:
                return None
        if int(softmax.attrs.axis) not in (-1, 3):
            return None
        x = softmax.args[0]
        scores, mask = x, None
        add = self.call(x, "relax.add")
        if add is not None:
            for s, m in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
                if self._scores_matmul(s) is not None:
                    scores, mask = s, m
                    break
            else:
                return None
        qk = self._scores_matmul(scores)
        if qk is None:
            return None
        matmul, s_scale = qk
        q_side = self.views_to_4d(matmul.args[0])
        if q_side is None:
            return None
        q4, q_scale = self.scaled(q_side)
        k_t = self.views_to_4d(matmul.args[1])
        if k_t is None:
            return None
        k_t, k_scale = self.scaled(k_t)
        q = self.heads_split(q4, [0, 2, 1, 3])
        v = self.heads_split(v4, [0, 2, 1, 3])
        k = self.heads_split(k_t, [0, 2, 3, 1])
        if k is None:
            transposed = self.call(k_t, "relax.permute_dims")
            if transposed is None or _axes(transposed, 4) != [0, 1, 3, 2]:
                return None
            k4, scale = self.scaled(transposed.args[0])
            k_scale *= scale
            k = self.heads_split(k4, [0, 2, 1, 3])
        if q is None or k is None or v is None:
            return None
        return self._site(result, q, k, v, mask, q_scale, k_scale, s_scale, guard)

    def _scores_matmul(self, expr) -> tuple[relax.Call, float] | None:
        """(matmul, c_s) for the scores = matmul(...) · c_s, the scale before or after the views."""
        expr, s_scale = self.scaled(expr)
        inner = self.walk_views(expr)
        if inner is not None and s_scale == 1.0:
            inner, s_scale = self.scaled(inner)
            inner = self.walk_views(inner)
        call = self.call(inner, "relax.matmul") if inner is not None else None
        return (call, s_scale) if call is not None else None

    def _zeros(self, expr) -> bool:
        """Whether expr is a float32 scalar 0 (shape [] or [1]) or full_like(_, 0)."""
        full = self.call(expr, "relax.full_like")
        return (_scalar(full.args[1]) if full is not None else _scalar(expr)) == 0.0

    def _zeroes_nan(self, where: relax.Call) -> bool:
        """where(isnan(p), 0, p): the ONNX export's Where(IsNaN(p), 0, p) of the same p."""
        isnan = self.call(where.args[0], "relax.isnan")
        return isnan is not None and isnan.args[0].same_as(where.args[2]) and self._zeros(where.args[1])

    def _zeroes_all_masked_rows(self, where: relax.Call, softmax: relax.Call) -> bool:
        """where(not(bool(max(int8(not(x == -inf)), -1, keepdims))), zeros, softmax(x))."""
        x = softmax.args[0]
        if not self._zeros(where.args[1]):
            return False
        chain = where.args[0]
        steps = [
            ("relax.logical_not", None),
            ("relax.astype", "bool"),
            ("relax.max", None),
            ("relax.astype", "int8"),
            ("relax.logical_not", None),
        ]
        for op, dtype in steps:
            call = self.call(chain, op)
            if call is None:
                return False
            if dtype is not None and str(call.attrs.dtype) != dtype:
                return False
            if op == "relax.max" and (not bool(call.attrs.keepdims) or _ints(call.attrs.axis) not in ([-1], [3])):
                return False
            chain = call.args[0]
        equal = self.call(chain, "relax.equal")
        if equal is None:
            return False
        other = equal.args[1] if equal.args[0].same_as(x) else equal.args[0] if equal.args[1].same_as(x) else None
        value = _scalar(other) if other is not None else None
        return value is not None and value == float("-inf")

    def _site(self, result, q, k, v, mask, q_scale, k_scale, s_scale, guard: str | None) -> AttentionSite | None:
        shapes = [self.shape(t) for t in (q, k, v)]
        if any(s is None or len(s) != 4 for s in shapes) or not all(_float32(t) for t in (q, k, v)):
            return None
        first = shapes[0]
        assert first is not None
        batch, seq, heads, head_dim = first
        if not all(self._same_shape(s, first) for s in shapes[1:]):
            return None  # cross attention, or different heads for k/v (GQA): not this kernel
        if not (isinstance(heads, tirx.IntImm) and isinstance(head_dim, tirx.IntImm)):
            return None
        heads, head_dim = int(heads), int(head_dim)
        if head_dim % HEAD_DIM_MULTIPLE:
            return None
        broadcast = None
        if mask is not None:
            broadcast = self._mask_broadcast(mask, batch, heads, seq)
            if broadcast is None:
                return None
        stacked = self._stacked(q, k, v, heads * head_dim)
        config = EncoderAttention(
            heads,
            head_dim,
            q_scale,
            k_scale,
            s_scale,
            broadcast,
            zero_masked_rows=guard == "zero_masked_rows",
            stacked_qkv=stacked is not None,
            zero_nan_rows=guard == "zero_nan_rows",
        )
        if stacked is not None:
            return AttentionSite(result, config, stacked, None, None, mask, batch, seq)
        return AttentionSite(result, config, q, k, v, mask, batch, seq)

    def _mask_broadcast(self, mask, batch, heads: int, seq) -> tuple[bool, bool, bool] | None:
        shape = self.shape(mask)
        if shape is None or not _float32(mask) or not 1 <= len(shape) <= 4:
            return None
        shape = [tirx.IntImm("int64", 1)] * (4 - len(shape)) + shape
        if not self.same(shape[3], seq):
            return None
        broadcast = []
        for dim, full in zip(shape[:3], (batch, tirx.IntImm("int64", heads), seq)):
            if isinstance(dim, tirx.IntImm) and int(dim) == 1:
                broadcast.append(True)
            elif self.same(dim, full):
                broadcast.append(False)
            else:
                return None
        return broadcast[0], broadcast[1], broadcast[2]

    def _stacked(self, q, k, v, width: int) -> relax.Expr | None:
        """The stacked [rows, 3·width] output when q, k, v are reshapes of its three equal split parts."""
        parts = []
        for t in (q, k, v):
            while (reshape := self.call(t, "relax.reshape")) is not None:
                t = reshape.args[0]
            item = self.var2val.get(t) if isinstance(t, relax.Var) else None
            if not isinstance(item, relax.TupleGetItem):
                return None
            parts.append(item)
        split = self.call(parts[0].tuple_value, "relax.split")
        if split is None or [int(p.index) for p in parts] != [0, 1, 2]:
            return None
        if any(not p.tuple_value.same_as(parts[0].tuple_value) for p in parts):
            return None
        source = split.args[0]
        shape = self.shape(source)
        if shape is None or not isinstance(shape[-1], tirx.IntImm) or int(shape[-1]) != 3 * width:
            return None
        if int(split.attrs.axis) not in (-1, len(shape) - 1) or _ints(split.attrs.indices_or_sections) != [
            width,
            2 * width,
        ]:
            return None
        return source


def _scalar(expr) -> float | None:
    """The value of a float32 scalar constant (shape [] or [1]), else None."""
    if not isinstance(expr, tvm.ir.Constant):
        return None
    value = expr.value.numpy()
    if value.dtype != np.float32 or value.size != 1 or value.ndim > 1:
        return None
    return float(value.reshape(()))


def _float32(expr) -> bool:
    ty = expr.ty
    return isinstance(ty, relax.TensorType) and str(ty.dtype) == "float32"


def _ints(values) -> list[int] | None:
    if values is None:
        return None
    if isinstance(values, (tirx.IntImm, int)):
        return [int(values)]
    return [int(v) for v in values]


def _axes(permute: relax.Call, ndim: int) -> list[int]:
    axes = permute.attrs.axes
    return list(range(ndim))[::-1] if axes is None else [int(a) % ndim for a in axes]


def _reshape_to_own_shape(value) -> bool:
    """Whether value is reshape(x, shape) of a var x whose shape is provably `shape`."""
    if not (isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.reshape"):
        return False
    source = value.args[0]
    if not isinstance(source, relax.Var):
        return False
    before, after = source.ty, value.ty
    if not all(isinstance(t, relax.TensorType) and hasattr(t.shape, "values") for t in (before, after)):
        return False
    dims = list(before.shape.values), list(after.shape.values)
    analyzer = Analyzer()
    return len(dims[0]) == len(dims[1]) and all(analyzer.can_prove_equal(a, b) for a, b in zip(*dims))


@expr_functor.mutator
class _AttentionFuser(PyExprMutator):
    """Emits each site's kernel call at its result's binding; folds the permute_dims after it that
    only undo the kernel's own [B, S, H, D] -> [B, H, S, D] (the frontends transpose back at once)."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.kernels: dict[EncoderAttention, relax.GlobalVar] = {}
        self.sites: dict[relax.Var, AttentionSite] = {}
        self.permuted: dict[relax.Var, tuple[relax.Expr, list[int]]] = {}  # var -> (kernel output, axes)

    def rewrite(self, func: relax.Function, sites: list[AttentionSite]) -> relax.Function:
        self.sites = {site.result: site for site in sites}
        self.permuted = {}
        return self.visit_expr(func)

    def visit_var_binding_(self, binding):
        site = self.sites.get(binding.var)
        if site is not None:
            out = self.builder_.emit(self._kernel_call(site))
            value = self.builder_.normalize(relax.op.permute_dims(out, [0, 2, 1, 3]))
            self.builder_.emit_normalized(relax.VarBinding(binding.var, value))
            self.permuted[binding.var] = (out, [0, 2, 1, 3])
            return
        permute = binding.value
        if (
            isinstance(permute, relax.Call)
            and getattr(permute.op, "name", "") == "relax.permute_dims"
            and isinstance(permute.args[0], relax.Var)
            and permute.args[0] in self.permuted
        ):
            source, before = self.permuted[permute.args[0]]
            axes = [before[a] for a in _axes(permute, len(before))]
            if axes == list(range(len(axes))):
                self.set_var_remap(binding.var, source)
            else:
                value = self.builder_.normalize(relax.op.permute_dims(source, axes))
                self.builder_.emit_normalized(relax.VarBinding(binding.var, value))
            self.permuted[binding.var] = (source, axes)
            return
        if _reshape_to_own_shape(binding.value) and binding.value.args[0] in self.permuted:
            # a no-op view (the ONNX import's Reshape back to [B, H, S, D]): the transpose after it still folds
            self.permuted[binding.var] = self.permuted[binding.value.args[0]]
        super().visit_var_binding_(binding)

    def _kernel_call(self, site: AttentionSite) -> relax.Call:
        config = site.config
        if config not in self.kernels:
            self.kernels[config] = self.builder_.add_func(encoder_attention_func(config), config.name())
        heads, head_dim = config.heads, config.head_dim
        if config.stacked_qkv:
            inputs = [relax.op.reshape(self.visit_expr(site.q), [site.batch, site.seq, 3, heads, head_dim])]
        else:
            inputs = [self.visit_expr(t) for t in (site.q, site.k, site.v)]
        if site.mask is not None:
            mask = self.visit_expr(site.mask)
            ndim = len(mask.ty.shape.values)
            if ndim < 4:
                mask = relax.op.reshape(mask, [1] * (4 - ndim) + list(mask.ty.shape.values))
            inputs.append(mask)
        args = [self.builder_.emit(a) if not isinstance(a, relax.Var) else a for a in inputs]
        out = relax.TensorType([site.batch, site.seq, heads, head_dim], "float32")
        return relax.call_tir(self.kernels[config], args, out)
