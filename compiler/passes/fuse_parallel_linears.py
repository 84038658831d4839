"""FuseParallelLinears: linear layers that read the same input become one linear over their weights
stacked by rows, its result cut back into each layer's columns for that layer's readers.

    q = x @ Wq^T + bq                        qkv = x @ [Wq; Wk; Wv]^T + [bq; bk; bv]    (one weight GEMM)
    k = x @ Wk^T + bk            ──▶         q, k, v = split(qkv, [Mq, Mq + Mk], axis=-1)
    v = x @ Wv^T + bv                                  (one copy kernel writing all three)

The stacked weight is a parameter of its own, named for its members (`layer.0.self.{query,key,value}.weight`),
in the place of the first; a decoder's gate/up projections and a GQA layer's k/v (or q/k/v) fuse the same
way. Fewer, larger calls: on a 2-core CPU a 384x384 weight GEMM over 128 tokens loses 0.06-0.10 ms to
the thread pool's start and its last uneven tiles, so MiniLM's 18 q/k/v GEMMs become 6 of 1152x384:
three 384x384 GEMMs 0.892 ms, one 1152x384 0.679 ms (N = 128; 1.04x at N = 1024; two 1536x384 as one:
1.01x; benchmarks/results/stacked_linears_cpu.json). In a MiniLM pass the q/k/v GEMMs took 3.80 ms
against 4.36 ms apart (VM profiler, 1x128), the split 0.12 ms (it was 0.13 ms as three strided_slices:
the reshapes after them stay views, so no slice fuses into its reader); end to end the change was
within this shared host's noise (benchmarks/results/minilm_tuned_cpu_fused_*.json).

Which layers fuse (each a linear of `RewriteLinearToWeightGemm`'s patterns, plain: no astype or
broadcast of W):
- they read the same input expression, their weights have one orientation, K and dtype, and all or none
  has a bias parameter;
- each weight is read by that one linear only (in every function: a decoder's prefill and decode fuse
  the same group or it stays apart), and nothing else reads its matmul result;
- `group_key(weight)` is equal and not None for all of them: the pipeline gives the storage decision
  (format, pruned), so only layers stored alike fuse, and a weight it leaves out (generic, calibrated)
  stays alone; `accepts(format key, M, K)` says whether the stacked shape can be stored that way;
- no member is a linear the CPU build fuses with its one reader (a GELU, a residual add: epilogues of
  `schedules/gemm_epilogue.py`; `epilogue_fused_weights` says which, from the rewrite pass's own
  patterns), which one kernel for the group could not keep.
Every weight format stores W row by row (per-row scales, row pruning), so the stacked weight packs to the
members' rows one after another. The groups are recorded in model.info["fused_linears"]
({stacked weight: [member weights]}) for the manifest.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor

from tensorpress.compiler.passes import binding_readers
from tensorpress.compiler.passes.drop_unused_weights import drop_unused_weights
from tensorpress.compiler.passes.rewrite_linear_to_weight_gemm import epilogue_fused_weights
from tensorpress.frontend.relax_params import is_model_function, split_params
from tensorpress.imported_model import ImportedModel

FUSED_LINEARS_INFO = "fused_linears"  # model.info key: {stacked weight: [member weights]}


@dataclass(frozen=True)
class _Linear:
    """One plain linear in a function: its weight (and bias) parameters and the bindings to replace."""

    weight: relax.Var
    bias: relax.Var | None
    x: relax.Expr
    input: tuple[relax.Expr, str]  # x seen through reshapes: (the tensor reshaped, x's shape); equal for one input
    top: relax.Var  # the binding of its result (the bias add, or the matmul)
    transposed: bool  # W stored [M, K] (matmul(x, permute_dims(W)))
    m: int
    k: int
    out_dtype: str


@dataclass(frozen=True)
class FusedGroup:
    """Members' weight (and bias) names in row order, the stacked parameters' names, and whether W is
    stored [M, K] (stacked along axis 0) or [K, M] (along axis 1)."""

    members: tuple[str, ...]
    biases: tuple[str, ...] | None
    transposed: bool
    weight: str
    bias: str | None


def stacked_name(names: list[str]) -> str:
    """`a.{q,k,v}.weight` for a.q.weight, a.k.weight, a.v.weight: the dotted parts the names share
    around the ones they do not (`{x,y}` of the whole names where they share none)."""
    parts = [n.split(".") for n in names]
    lead = 0
    while all(len(p) > lead + 1 for p in parts) and len({p[lead] for p in parts}) == 1:
        lead += 1
    tail = 0
    while all(len(p) > lead + tail + 1 for p in parts) and len({p[-1 - tail] for p in parts}) == 1:
        tail += 1
    middles = [".".join(p[lead : len(p) - tail]) for p in parts]
    return ".".join([*parts[0][:lead], "{" + ",".join(middles) + "}", *parts[0][len(parts[0]) - tail :]])


class FuseParallelLinears:
    """The pass (module docstring). `group_key(weight name)`: layers fuse only under one key (None: the
    weight stays alone); `accepts(key, m, k)`: whether the stacked [m, k] weight can be stored as `key` says."""

    def __init__(
        self,
        group_key: Callable[[str], Hashable | None],
        accepts: Callable[[Hashable, int, int], bool] = lambda key, m, k: True,
    ):
        self.group_key = group_key
        self.accepts = accepts

    def __call__(self, model: ImportedModel) -> ImportedModel:
        per_function = {
            gvar: _plain_linears(func)
            for gvar, func in model.mod.functions_items()
            if isinstance(func, relax.Function) and is_model_function(func)
        }
        groups = self._groups(per_function)
        if not groups:
            return model
        params = _stacked_params(model.params, groups)
        mutator = _Fuser(model.mod, groups, params)
        for gvar, linears in per_function.items():
            func = model.mod[gvar]
            if any(lin.weight.name in mutator.group_of for lin in linears):
                mutator.builder_.update_func(gvar, mutator.rewrite_function(func, linears))
        info = {**model.info, FUSED_LINEARS_INFO: {g.weight: list(g.members) for g in groups}}
        # the members' own weights are read no more: dropped from the functions and the params
        return drop_unused_weights(dataclasses.replace(model, mod=mutator.builder_.get(), params=params, info=info))

    def _groups(self, per_function: dict[relax.GlobalVar, list[_Linear]]) -> list[FusedGroup]:
        """The groups every function reading their weights agrees on (module docstring)."""
        candidates: dict[FusedGroup, None] = {}
        group_in: dict[str, list[FusedGroup | None]] = {}  # weight -> its group in each function reading it
        for linears in per_function.values():
            groups = self._function_groups(linears)
            grouped = {name: g for g in groups for name in g.members}
            for lin in linears:
                group_in.setdefault(lin.weight.name, []).append(grouped.get(lin.weight.name))
            candidates.update(dict.fromkeys(groups))
        return [g for g in candidates if all(seen == g for name in g.members for seen in group_in[name])]

    def _function_groups(self, linears: list[_Linear]) -> list[FusedGroup]:
        by_input: dict[tuple, list[_Linear]] = {}
        for lin in linears:
            key = self.group_key(lin.weight.name)
            if key is None:
                continue
            facts = (lin.transposed, lin.k, str(lin.weight.ty.dtype), lin.out_dtype, lin.bias is not None, key)
            by_input.setdefault((lin.input, facts), []).append(lin)
        groups = []
        for (_, facts), members in by_input.items():
            if len(members) < 2 or not self.accepts(facts[-1], sum(lin.m for lin in members), members[0].k):
                continue
            names = tuple(lin.weight.name for lin in members)
            biases = tuple(lin.bias.name for lin in members if lin.bias is not None) or None
            bias = stacked_name(list(biases)) if biases else None
            groups.append(FusedGroup(names, biases, members[0].transposed, stacked_name(list(names)), bias))
        return groups


def _plain_linears(func: relax.Function) -> list[_Linear]:
    """The linears of `func` that could fuse: plain form, static 2-D weight parameter, each weight read by
    this one linear, its result read by something other than an epilogue op the CPU would fuse."""
    weights = set(split_params(func)[1])
    var2val = relax.analysis.get_var2val(func)
    readers = binding_readers(func)

    found: dict[relax.Var, _Linear] = {}
    rejected: set[relax.Var] = set()
    for block in func.body.blocks:
        for binding in block.bindings:
            lin = _linear_at(binding, var2val, weights, readers)
            if lin is None:
                continue
            if lin.bias is not None:  # the matmul's own binding was found first, bias-less: replace it
                matmul_var = _matmul_operand(binding.value, var2val)
                if found.get(lin.weight) is not None and found[lin.weight].top.same_as(matmul_var):
                    del found[lin.weight]
            if lin.weight in found or lin.weight in rejected:
                rejected.add(lin.weight)
                found.pop(lin.weight, None)
                continue
            found[lin.weight] = lin
    # Each weight read by exactly the plain linear found (permute_dims of it once, by its matmul), and not
    # one the CPU build makes one kernel with its reader (which a kernel for the group could not keep).
    fused_with_epilogue = epilogue_fused_weights(func)
    kept = []
    for weight, lin in found.items():
        if len(readers.get(weight, [])) != 1:  # a transposed W: its permute_dims, read by the matmul alone
            continue
        if lin.weight.name in fused_with_epilogue:
            continue
        if lin.bias is not None and len(readers.get(_matmul_operand(var2val[lin.top], var2val), [])) != 1:
            continue  # the bias-less product is read too
        kept.append(lin)
    return kept


def _linear_at(binding, var2val, weights, readers) -> _Linear | None:
    """The plain linear whose result `binding` binds (matmul, or matmul + bias parameter), or None."""
    value = binding.value
    if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
        return None
    bias = None
    mm = value
    if value.op.name == "relax.add":
        operand = _matmul_operand(value, var2val)
        if operand is None:
            return None
        other = value.args[1] if value.args[0].same_as(operand) else value.args[0]
        if not (isinstance(other, relax.Var) and other in weights and other.ty.ndim == 1):
            return None
        bias, mm = other, var2val[operand]
    if not (isinstance(mm, relax.Call) and isinstance(mm.op, tvm.ir.Op) and mm.op.name == "relax.matmul"):
        return None
    x, w = mm.args
    transposed = False
    if isinstance(w, relax.Var) and w in var2val:
        permute = var2val[w]
        if not (isinstance(permute, relax.Call) and getattr(permute.op, "name", "") == "relax.permute_dims"):
            return None
        axes = permute.attrs.axes
        if axes is not None and [int(a) for a in axes] != [1, 0]:
            return None
        if len(readers.get(w, [])) != 1:
            return None
        w, transposed = permute.args[0], True
    if not (isinstance(w, relax.Var) and w in weights and w.ty.ndim == 2):
        return None
    if not isinstance(x.ty, relax.TensorType) or x.ty.ndim < 1:
        return None
    dims = w.ty.shape.values
    if any(not isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    rows, cols = (int(d) for d in dims)
    m, k = (rows, cols) if transposed else (cols, rows)
    if bias is not None and [int(d) for d in bias.ty.shape.values] != [m]:
        return None
    source = x
    while isinstance(source, relax.Var) and getattr(var2val.get(source), "op", None) == tvm.ir.Op.get("relax.reshape"):
        source = var2val[source].args[0]  # each linear may reshape the shared input itself (torch's [b*s, K])
    facts = (w, bias, x, (source, str(x.ty.shape)), binding.var, transposed, m, k, str(binding.var.ty.dtype))
    return _Linear(*facts)


def _matmul_operand(add: relax.Call, var2val) -> relax.Var | None:
    """The operand of `add` that a relax.matmul binds, or None."""
    for arg in add.args:
        value = var2val.get(arg) if isinstance(arg, relax.Var) else None
        if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.matmul":
            return arg
    return None


def _stacked_params(params: dict[str, np.ndarray], groups: list[FusedGroup]) -> dict[str, np.ndarray]:
    """`params` with each group's stacked weight (and bias) just before its first member; the members stay
    (dropped later where no function reads them any more)."""
    first_of = {g.members[0]: g for g in groups}
    out: dict[str, np.ndarray] = {}
    for name, value in params.items():
        group = first_of.get(name)
        if group is not None:
            out[group.weight] = _stack([params[n] for n in group.members], axis=0 if group.transposed else 1)
            if group.bias is not None and group.biases is not None:
                out[group.bias] = _stack([params[n] for n in group.biases], axis=0)
        out[name] = value
    return out


def _stack(arrays: list[np.ndarray], axis: int) -> np.ndarray:
    """The arrays joined along `axis`; arrays that are each one value broadcast (store_weights=False gives
    shapes only, as zero-stride zeros) stay a broadcast, so a 7B-shaped model is not made in memory."""
    arrays = [np.asarray(a) for a in arrays]
    if all(a.size and not any(a.strides) for a in arrays) and len({a.flat[0] for a in arrays}) == 1:
        shape = list(arrays[0].shape)
        shape[axis] = sum(a.shape[axis] for a in arrays)
        return np.broadcast_to(np.asarray(arrays[0].flat[0], arrays[0].dtype), tuple(shape))
    return np.ascontiguousarray(np.concatenate(arrays, axis=axis))


@expr_functor.mutator
class _Fuser(PyExprMutator):
    """Emits each group's stacked linear at its first member's binding and binds every member's result
    to its slice of it."""

    def __init__(self, mod: tvm.IRModule, groups: list[FusedGroup], params: dict[str, np.ndarray]):
        super().__init__(mod)
        self.params = params  # with the stacked arrays (`_stacked_params`)
        self.group_of = {name: g for g in groups for name in g.members}
        self._members: dict[relax.Var, tuple[FusedGroup, int]] = {}  # top var -> (group, its place in it)
        self._linears: dict[FusedGroup, list[_Linear]] = {}
        self._fused: dict[FusedGroup, relax.Var] = {}
        self._param_vars: dict[str, relax.Var] = {}

    def rewrite_function(self, func: relax.Function, linears: list[_Linear]) -> relax.Function:
        self._members, self._linears, self._fused, self._param_vars = {}, {}, {}, {}
        by_name = {lin.weight.name: lin for lin in linears}
        for group in dict.fromkeys(self.group_of[n] for n in by_name if n in self.group_of):
            members = [by_name[n] for n in group.members]
            self._linears[group] = members
            for index, lin in enumerate(members):
                self._members[lin.top] = (group, index)
            for name in (group.weight, group.bias):
                if name is not None:
                    value = self.params[name]
                    self._param_vars[name] = relax.Var(name, relax.TensorType(value.shape, str(value.dtype)))
        num_input = len(split_params(func)[0])
        body = self.visit_expr(func)
        new_params = list(body.params)
        for group in self._linears:  # the stacked parameters go before their first member's
            at = next(i for i, p in enumerate(new_params[num_input:], num_input) if p.name == group.members[0])
            new_params[at:at] = [self._param_vars[n] for n in (group.weight, group.bias) if n is not None]
        return relax.Function(new_params, body.body, body.ret_ty, body.is_pure, body.attrs)

    def visit_var_binding_(self, binding):
        member = self._members.get(binding.var)
        if member is None:
            return super().visit_var_binding_(binding)
        group, index = member
        if group not in self._fused:
            self._fused[group] = self._emit_stacked(group, binding.var.ty.ndim - 1)
        piece = relax.TupleGetItem(self._fused[group], index)
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(piece)))

    def _emit_stacked(self, group: FusedGroup, axis: int) -> relax.Var:
        """x @ W_stacked (+ b_stacked) in the form the frontends give a linear, at the first member, split
        along `axis` into the members' results (one kernel writing them all: a strided_slice each could
        not fuse into its reader past the reshapes, which stay views, and cost a kernel per member)."""
        first = self._linears[group][0]
        x = self.visit_expr(first.x)
        w: relax.Expr = self._param_vars[group.weight]
        if group.transposed:
            w = self.builder_.emit(relax.op.permute_dims(w, [1, 0]))
        y = self.builder_.emit(relax.op.matmul(x, w, out_dtype=first.out_dtype))
        if group.bias is not None:
            y = self.builder_.emit(relax.op.add(y, self._param_vars[group.bias]))
        ends = list(itertools.accumulate(lin.m for lin in self._linears[group]))
        return self.builder_.emit(relax.op.split(y, indices_or_sections=ends[:-1], axis=axis))
