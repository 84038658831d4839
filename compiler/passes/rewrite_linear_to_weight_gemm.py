"""RewriteLinearToWeightGemm: linear layers with a weight parameter -> the weight-GEMM kernel of a format.

Every frontend lowers a linear layer to one of

    matmul(x, permute_dims(W))      W: [M, K] parameter (torch nn.Linear, ONNX Gemm transB=1)
    matmul(x, W)                    W: [K, M] parameter (ONNX MatMul with an initializer)

optionally followed by add(·, b) with a bias parameter b: [M], with astype() around W where a dtype
conversion put one there, and with broadcast_to() adding batch dimensions to W (torch's expand + bmm).
Each such site whose weight the plan assigns a format becomes

    y = reshape(call_tir(weight_gemm[format, M, K], [reshape(x, [N, K]), *packed arrays(, b)]), [..., M])

The weight is packed offline by the format (pure numpy, `compiler/formats/`); the packed arrays replace
W among the function's trailing parameters, in the same place, named `<W>.<array>`. A weight that
something other than a rewritten linear still uses stays as it is; a format that stores the weight
exactly as the parameter holds it (dense fp16 [M, K] from an fp16 model) reads the parameter itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from tensorpress.compiler.formats import PackedWeight, decode_stage
from tensorpress.frontend.relax_params import rename_params, split_params
from tensorpress.imported_model import ImportedModel
from tensorpress.schedules.gemm_epilogue import GemmEpilogue
from tensorpress.schedules.weight_gemm import N_HINT_ATTR, make_weight_gemm


@dataclass(frozen=True)
class LinearSite:
    """A linear layer found in the graph: its weight parameter, sizes and activation dtype."""

    weight: str
    m: int  # output features
    k: int  # input features
    act_dtype: str
    transposed_in_graph: bool  # True when the parameter is stored [M, K] (matmul(x, permute_dims(W)))
    bias: str | None
    also_read_by: str | None = None  # an op other than a linear that reads W too (`take`: a tied embedding)


@dataclass(frozen=True)
class LayerChoice:
    """What the plan decided for one weight: the format it is stored in, and the kernel's act dtype."""

    format: str
    act_dtype: str


def _linear_patterns():
    x, w, b = wildcard(), wildcard(), wildcard()
    w_maybe_cast = w | is_op("relax.astype")(w)
    w_t = is_op("relax.permute_dims")(w_maybe_cast)
    # torch decomposes some linears into a batched matmul of broadcast operands (expand + bmm); a
    # broadcast that only adds leading batch dimensions to W is still the same linear layer.
    mm_t = is_op("relax.matmul")(x, w_t | is_op("relax.broadcast_to")(w_t, wildcard()))
    mm = is_op("relax.matmul")(x, w_maybe_cast | is_op("relax.broadcast_to")(w_maybe_cast, wildcard()))
    return x, w, b, w_t, [is_op("relax.add")(mm_t, b), is_op("relax.add")(mm, b), mm_t, mm]


def _weight_params(func: relax.Function) -> dict[relax.Var, str]:
    return {var: var.name for var in split_params(func)[1]}


def _site_from_match(match, func_weights, pats) -> LinearSite | None:
    x_pat, w_pat, b_pat, w_t_pat, _ = pats
    x, w = match[x_pat], match[w_pat]
    if not isinstance(w, relax.Var) or w not in func_weights:
        return None
    w_ty, x_ty = w.ty, x.ty
    if not isinstance(x_ty, relax.TensorType) or x_ty.ndim < 1 or w_ty.ndim != 2:
        return None
    if any(not isinstance(d, tvm.tirx.IntImm) for d in w_ty.shape.values):
        return None
    rows, cols = (int(d) for d in w_ty.shape.values)
    transposed = w_t_pat in match
    if transposed:
        axes = match[w_t_pat].attrs.axes
        if axes is not None and [int(a) for a in axes] != [1, 0]:
            return None
    m, k = (rows, cols) if transposed else (cols, rows)
    bias = None
    if b_pat in match:
        b = match[b_pat]
        if not (isinstance(b, relax.Var) and b in func_weights and b.ty.ndim == 1):
            return None
        if [int(d) for d in b.ty.shape.values] != [m]:
            return None
        bias = func_weights[b]
    return LinearSite(func_weights[w], m, k, str(x_ty.dtype), transposed, bias)


def find_linear_sites(mod: tvm.IRModule) -> list[LinearSite]:
    """Every linear layer of every Relax function in `mod`, one entry per distinct weight."""
    pats = _linear_patterns()
    found: dict[str, LinearSite] = {}
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        func_weights = _weight_params(func)
        for pattern in pats[4]:

            def record(call, match, func_weights=func_weights):
                site = _site_from_match(match, func_weights, pats)
                if site is None:
                    return call
                first = found.setdefault(site.weight, site)
                if first.transposed_in_graph != site.transposed_in_graph and first.also_read_by is None:
                    # One parameter read as W by one matmul and as W^T by another: only the first
                    # orientation becomes a weight GEMM (see _rewrite_function); the other stays a matmul.
                    found[site.weight] = replace(first, also_read_by=_OTHER_ORIENTATION)
                return call

            rewrite_call(pattern, record, func)
        for name, op in _non_linear_readers(func, func_weights).items():
            if name in found and found[name].also_read_by is None:
                found[name] = replace(found[name], also_read_by=op)
    return list(found.values())


# also_read_by of a weight that one matmul reads as [K, M] and another as [M, K].
_OTHER_ORIENTATION = "a matmul of its transpose"

# The ops a linear layer's weight passes through on its way into the matmul (see _linear_patterns).
_LINEAR_OPS = {"relax.permute_dims", "relax.astype", "relax.broadcast_to", "relax.matmul"}


def _non_linear_readers(func: relax.Function, func_weights: dict[relax.Var, str]) -> dict[str, str]:
    """{weight: name of an op that reads it, directly or through permute_dims/astype/broadcast_to,
    and is not a linear's matmul} for the weights something else reads too (e.g. an embedding's take)."""
    readers: dict[relax.Var, list[tuple[relax.Var, str]]] = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
                for arg in value.args:
                    if isinstance(arg, relax.Var):
                        readers.setdefault(arg, []).append((binding.var, value.op.name))
            elif isinstance(value, relax.Var):
                readers.setdefault(value, []).append((binding.var, "relax.alias"))
    found = {}
    for weight, name in func_weights.items():
        todo, seen = [weight], set()
        while todo and name not in found:
            var = todo.pop()
            for result, op in readers.get(var, []):
                if op not in _LINEAR_OPS and op != "relax.alias":
                    found[name] = op.removeprefix("relax.")
                    break
                if op != "relax.matmul" and result not in seen:
                    seen.add(result)
                    todo.append(result)
    return found


class RewriteLinearToWeightGemm:
    """The pass. `choices` maps weight names to their LayerChoice; weights not in it are left alone.

    `pack(name, weight [M, K] float32, choice) -> PackedWeight` is the format's packer.
    `fuse_epilogues`: a linear whose only reader is a GELU or an add of a tensor of its own shape (a
    residual connection) becomes one kernel that computes that op in its store stage
    (`schedules/gemm_epilogue.py`). For CPU targets only: the fused GELU's erf is the fast polynomial
    the CPU pipeline gives every erf (FastMathTransform), which CUDA builds do not use, and the Tensor
    Core template's store reads no residual.
    """

    def __init__(self, choices: dict[str, LayerChoice], pack, fuse_epilogues: bool = False):
        self.choices = choices
        self.pack = pack
        self.fuse_epilogues = fuse_epilogues

    def __call__(self, model: ImportedModel) -> ImportedModel:
        bb = relax.BlockBuilder(model.mod)
        kernels: dict[tuple, relax.GlobalVar] = {}
        packed: dict[str, PackedWeight] = {}
        packed_transposed: dict[str, bool] = {}  # weight -> the orientation its packing was made from
        pats = _linear_patterns()
        new_funcs = {}
        for gvar, func in model.mod.functions_items():
            if isinstance(func, relax.Function) and _weight_params(func):
                new_funcs[gvar] = self._rewrite_function(
                    func, model, bb, kernels, packed, packed_transposed, pats, gvar.name_hint
                )
        # A weight stored as one array takes over its original name, unless the original is still
        # read by something else (e.g. an embedding tied to the LM head).
        still_used = {v.name for f in new_funcs.values() for v in f.params}
        short = {
            packed_param_name(w, pw, a): w
            for w, pw in packed.items()
            for a in pw.arrays
            if len(pw.arrays) == 1 and w not in still_used
        }
        mod = bb.get()
        for gvar, func in new_funcs.items():
            mod[gvar] = rename_params(func, short)
        mod = relax.transform.DeadCodeElimination()(mod)
        params = _new_param_order(model.params, packed, short, mod)
        return model.with_module(mod, params)

    def _rewrite_function(self, func, model, bb, kernels, packed, packed_transposed, pats, func_name):
        func_weights = _weight_params(func)
        packed_vars: dict[str, relax.Var] = {}
        aliased: set[str] = set()  # packed arrays that are the original parameter itself

        def rewriter(call, match, epilogue=None, residual=None):
            site = _site_from_match(match, func_weights, pats)
            if site is None or site.weight not in self.choices:
                return call
            if site.bias is not None and match[pats[2]] is None:
                return call
            choice = self.choices[site.weight]
            if site.weight not in packed:
                w = np.asarray(model.params[site.weight], dtype=np.float32)
                packed[site.weight] = self.pack(site.weight, w if site.transposed_in_graph else w.T, choice)
                packed_transposed[site.weight] = site.transposed_in_graph
            if packed_transposed[site.weight] != site.transposed_in_graph:
                return call  # the weight is packed as the other orientation's [M, K]: this matmul stays
            pw = packed[site.weight]
            for array_name, array in pw.arrays.items():
                key = packed_param_name(site.weight, pw, array_name)
                if key in packed_vars:
                    continue
                if len(pw.arrays) == 1 and _same_array(array, model.params[site.weight]):
                    # The format stores the parameter as it is (dense fp16 [M, K]): the kernel reads it in
                    # place, so a weight an embedding also reads (tied LM head) is not stored twice.
                    packed_vars[key] = match[pats[1]]
                    aliased.add(key)
                else:
                    packed_vars[key] = relax.Var(key, relax.TensorType(array.shape, str(array.dtype)))
            stored = [packed_vars[packed_param_name(site.weight, pw, a)] for a in pw.arrays]
            x = match[pats[0]]
            hint = token_count_hint(x, func_name)
            # the layer's own result dtype: a matmul may widen (out_dtype="float32" on fp16 operands)
            out_dtype = str(call.ty.dtype)
            fused = FusedEpilogue(epilogue or GemmEpilogue(), residual)
            y = _emit_weight_gemm(x, stored, site, choice, pw, match, pats, bb, kernels, hint, out_dtype, fused)
            return call if y is None else y

        body_func = func
        if self.fuse_epilogues:  # a linear and the one op reading it, before the linears alone
            single_use = _single_use_weights(func, pats, func_weights)
            for pattern, fuse in _epilogue_patterns(pats, single_use, func_weights):
                body_func = rewrite_call(pattern, lambda call, match, fuse=fuse: fuse(call, match, rewriter), body_func)
        for pattern in pats[4]:  # with-bias patterns first, so the add is fused into the kernel
            body_func = rewrite_call(pattern, rewriter, body_func)
        if not packed_vars:
            return func
        inputs, old_weights = split_params(func)
        free = set(relax.analysis.free_vars(body_func.body))
        weights: list[relax.Var] = []
        old_by_name = {v.name: v for v in old_weights}
        for name in model.params:
            if name in old_by_name and old_by_name[name] in free:
                weights.append(old_by_name[name])
            if name in packed:
                names = [packed_param_name(name, packed[name], a) for a in packed[name].arrays]
                weights.extend(packed_vars[n] for n in names if n in packed_vars and n not in aliased)
        return relax.Function(inputs + weights, body_func.body, func.ret_ty, func.is_pure, func.attrs)


@dataclass(frozen=True)
class FusedEpilogue:
    """What a weight-GEMM call computes after its sums: the epilogue, and the residual expression it adds."""

    epilogue: GemmEpilogue
    residual: relax.Expr | None = None


def _epilogue_patterns(pats, single_use: set[str], func_weights):
    """[(pattern, fuse)] for a linear (maybe reshaped, e.g. [b*s, M] -> [b, s, M]) read only by a GELU or
    by an add of a tensor of its shape; fuse(call, match, rewriter) rewrites the match as one weight GEMM
    (reshaped as the op's result), or returns `call` unchanged. `single_use`: the weights whose linears'
    results are each read once (`_single_use_weights`)."""
    linear = _any_linear(pats)
    source = _linear_maybe_reshaped(linear)
    other = wildcard()

    def fused(call, match, rewriter, epilogue, residual=None):
        site = _site_from_match(match, func_weights, pats)
        if site is None or site.weight not in single_use:
            return call
        y = rewriter(call, match, epilogue, residual)
        if y is call or match[source].same_as(match[linear]):
            return y
        return relax.op.reshape(y, call.ty.shape)  # the op read the linear reshaped: its result is too

    def gelu(call, match, rewriter):
        return fused(call, match, rewriter, GemmEpilogue(activation="gelu"))

    def residual(call, match, rewriter):
        res = match[other]
        if not _same_tensor_type(match[source].ty, res.ty):
            return call
        return fused(call, match, rewriter, GemmEpilogue(residual=True), res)

    # (relax.add matches either operand order: the pattern matcher knows it commutes)
    return [(is_op("relax.nn.gelu")(source), gelu), (is_op("relax.add")(source, other), residual)]


def epilogue_fused_weights(func: relax.Function) -> set[str]:
    """The weights of `func` whose linear `RewriteLinearToWeightGemm(fuse_epilogues=True)` makes one kernel
    with the op reading it (a GELU, a residual add): the same patterns, matched without rewriting."""
    pats = _linear_patterns()
    func_weights = _weight_params(func)
    found: set[str] = set()

    def record(call, match, epilogue=None, residual=None):
        site = _site_from_match(match, func_weights, pats)
        if site is not None and (site.bias is None or match[pats[2]] is not None):
            found.add(site.weight)
        return call

    for pattern, fuse in _epilogue_patterns(pats, _single_use_weights(func, pats, func_weights), func_weights):
        rewrite_call(pattern, lambda call, match, fuse=fuse: fuse(call, match, record), func)
    return found


def _any_linear(pats):
    return pats[4][0] | pats[4][1] | pats[4][2] | pats[4][3]


def _linear_maybe_reshaped(linear):
    return linear | is_op("relax.reshape")(linear, wildcard())


def _single_use_weights(func: relax.Function, pats, func_weights) -> set[str]:
    """The weights every linear of which (each binding a linear pattern matches: the matmul, the bias
    add, a reshape of the result) has its result read once in `func`; a linear whose result something
    else reads too stays a kernel of its own, so its epilogue op is not fused."""
    uses: dict[relax.Var, int] = {}

    def count(expr):
        if isinstance(expr, relax.Var):
            uses[expr] = uses.get(expr, 0) + 1

    bindings = [b for block in func.body.blocks for b in block.bindings]
    for binding in bindings:
        relax.analysis.post_order_visit(binding.value, count)
    relax.analysis.post_order_visit(func.body.body, count)
    var2val = relax.analysis.get_var2val(func)
    linear = _linear_maybe_reshaped(_any_linear(pats))
    single: set[str] = set()
    shared: set[str] = set()
    for binding in bindings:
        match = linear.extract_matched_expr(binding.value, var2val)
        site = _site_from_match(match, func_weights, pats) if match else None
        if site is not None:
            (single if uses.get(binding.var, 0) == 1 else shared).add(site.weight)
    return single - shared


def _same_tensor_type(a, b) -> bool:
    """Both tensors of one known shape (the same symbolic dims) and dtype: an add that broadcasts nothing."""
    if not isinstance(a, relax.TensorType) or not isinstance(b, relax.TensorType):
        return False
    if a.shape is None or b.shape is None or str(a.dtype) != str(b.dtype):
        return False
    return bool(tvm_ffi.structural_equal(a.shape, b.shape))


def _same_array(array: np.ndarray, original) -> bool:
    original = np.asarray(original)
    if array.dtype != original.dtype or array.shape != original.shape:
        return False
    return bool(np.array_equal(array.view(np.uint8), np.ascontiguousarray(original).view(np.uint8)))  # bits


def packed_param_name(weight: str, packed: PackedWeight, array_name: str) -> str:
    """The parameter holding one of a packed weight's arrays: `fc1.weight.<array>`."""
    return f"{weight}.{array_name}"


def token_count_hint(x, func_name: str) -> int:
    """About how many rows N = prod(x.shape[:-1]) a call sees: the static N when there is one, 16 in
    a decoder's `decode` (one token per sequence), else 128 (prefill, encoders)."""
    n = 1
    for dim in x.ty.shape.values[:-1]:
        if not isinstance(dim, tvm.tirx.IntImm):
            return 16 if func_name.startswith("decode") else 128
        n *= int(dim)
    return n


def _emit_weight_gemm(x, stored, site, choice, packed, match, pats, bb, kernels, n_hint, out_dtype, fused):
    """y = reshape(call_tir(kernel, [x2d, *stored(, bias)(, residual2d)]), out_shape), with dtype casts if
    needed (x to the kernel's activation dtype, y to the layer's `out_dtype`); `fused`: the epilogue the
    kernel computes (returns None where it cannot: a result cast after the kernel)."""
    x_ty = x.ty
    orig_dtype = str(x_ty.dtype)
    lead = list(x_ty.shape.values[:-1])
    n = 1
    for d in lead:
        n = n * d
    has_bias = site.bias is not None
    # A layer that widens its result (fp16 operands, float32 out) gets the kernel's fp32 sum itself,
    # not a copy rounded through fp16; any other dtype change is a cast after the kernel.
    kernel_out = "float32" if out_dtype == "float32" else choice.act_dtype
    epilogue = fused.epilogue
    if not epilogue.empty and out_dtype != kernel_out:
        return None  # the epilogue would act on the sum before the cast the layer rounds it through
    # One kernel per stored layout: the packed weight's buffers (their sizes may depend on the data).
    stage_name = packed.format
    key = (stage_name, tuple(packed.buffers), site.m, site.k, choice.act_dtype, kernel_out, has_bias, n_hint, epilogue)
    if key not in kernels:
        func = make_weight_gemm(
            decode_stage(stage_name),
            site.m,
            site.k,
            act_dtype=choice.act_dtype,
            out_dtype=kernel_out,
            with_bias=has_bias,
            buffers=packed.buffers,
            epilogue=epilogue,
        )
        name = f"weight_gemm_{stage_name}_{site.m}x{site.k}_{choice.act_dtype}" + ("_bias" if has_bias else "")
        name += epilogue.name_suffix()
        name += f"_out_{kernel_out}" if kernel_out != choice.act_dtype else ""
        name = f"{name}_n{n_hint}".replace("-", "_")
        # Layers of one shape whose stored buffers differ in size (tiled-csl's word count follows the
        # data) get kernels of their own, and each needs its own symbol.
        name = _unused_name(name, {gv.name_hint for gv in kernels.values()})
        func = func.with_attr("global_symbol", name).with_attr(N_HINT_ATTR, n_hint)
        kernels[key] = bb.add_func(func, name)
    x2d = relax.op.reshape(x, [n, site.k]) if len(lead) != 1 else x
    if orig_dtype != choice.act_dtype:
        x2d = relax.op.astype(x2d, choice.act_dtype)
    args = [x2d, *stored]
    if has_bias:
        bias = match[pats[2]]
        args.append(relax.op.astype(bias, choice.act_dtype) if str(bias.ty.dtype) != choice.act_dtype else bias)
    if fused.residual is not None:
        residual = fused.residual
        args.append(relax.op.reshape(residual, [n, site.m]) if residual.ty.ndim != 2 else residual)
    y = relax.call_tir(kernels[key], args, relax.TensorType([n, site.m], kernel_out))
    if out_dtype != kernel_out:
        y = relax.op.astype(y, out_dtype)
    return relax.op.reshape(y, [*lead, site.m]) if len(lead) != 1 else y


def _unused_name(name: str, taken: set[str]) -> str:
    """`name`, or `name_1`, `name_2`, ... : the first that is not in `taken`."""
    unique, suffix = name, 1
    while unique in taken:
        unique, suffix = f"{name}_{suffix}", suffix + 1
    return unique


def _new_param_order(
    old: dict[str, np.ndarray], packed: dict[str, PackedWeight], short: dict[str, str], mod: tvm.IRModule
) -> dict[str, np.ndarray]:
    """Old params with each packed weight replaced, in place, by its arrays (under their final names);
    an original weight stays only where some function still reads it."""
    used = {v.name for _, f in mod.functions_items() if isinstance(f, relax.Function) for v in f.params}
    params: dict[str, np.ndarray] = {}
    for name, value in old.items():
        for array_name, array in packed[name].arrays.items() if name in packed else ():
            long_name = packed_param_name(name, packed[name], array_name)
            final = short.get(long_name, long_name)
            if final in used:
                params[final] = array
        if name in used and name not in params:
            params[name] = value
    return params


def linear_site_inputs(func: relax.Function) -> dict[str, list[relax.Expr]]:
    """{weight name: the activation expression x of each linear layer that reads it} in `func`, the
    [.., K] operand its weight GEMM would multiply (calibration exposes them as outputs)."""
    pats = _linear_patterns()
    func_weights = _weight_params(func)
    found: dict[str, list[relax.Expr]] = {}
    for pattern in pats[4]:

        def record(call, match):
            site = _site_from_match(match, func_weights, pats)
            if site is not None:
                # One input once: the bias-less patterns match a biased linear's matmul again, and the
                # matcher may hand the same input back as a new, structurally equal expression (MiniLM's
                # key and value were counted twice). Equal free variables compare by identity, so two
                # different inputs of one shared weight stay two.
                xs = found.setdefault(site.weight, [])
                if not any(tvm_ffi.structural_equal(match[pats[0]], x) for x in xs):
                    xs.append(match[pats[0]])
            return call

        rewrite_call(pattern, record, func)
    return found
