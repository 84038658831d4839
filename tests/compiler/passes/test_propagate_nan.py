"""PropagateNaN: the kernels the build's TIR pipeline lowers return NaN from min/max, reductions and the
fast-math polynomials where numpy does, keep ±Inf where numpy does, and on CUDA every min/max is guarded."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import tvm
from tvm import relax, te, topi

from tensorpress.compiler.build import _relax_pipeline, tir_pipeline
from tensorpress.compiler.targets import TargetSpec

SPECIALS = np.array([np.nan, np.inf, -np.inf, 0.0, 1.0, -3.0, 100.0, -100.0], np.float32)


def _build_cpu(compute, n: int = SPECIALS.size):
    x = te.placeholder((n,), "float32", name="x")
    func = te.create_prim_func([x, compute(x)]).with_attr("global_symbol", "main")
    return tvm.tirx.build(tvm.IRModule({"main": func}), target=TargetSpec("cpu").tvm_target(), pipeline=tir_pipeline())


def _run(lib, x: np.ndarray, out_shape) -> np.ndarray:
    out = tvm.runtime.empty(out_shape, "float32")
    lib["main"](tvm.runtime.tensor(x), out)
    return out.numpy()


def _assert_same(got, want, atol=1e-6):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, equal_nan=True)


@pytest.mark.parametrize(
    "compute, reference",
    [
        (lambda x: topi.maximum(x, 0.0), lambda x: np.maximum(x, 0)),
        (lambda x: topi.minimum(0.5, x), lambda x: np.minimum(0.5, x)),
        (lambda x: topi.clip(x, -1.0, 1.0), lambda x: np.clip(x, -1, 1)),
        (topi.fast_exp, np.exp),  # exp(-inf) = 0, exp(inf) = inf
        (topi.fast_tanh, np.tanh),
        (topi.fast_erf, np.vectorize(math.erf, otypes=[np.float32])),
    ],
    ids=["relu", "min-const-left", "clip", "fast_exp", "fast_tanh", "fast_erf"],
)
def test_elementwise_kernels_keep_nan_and_inf(compute, reference):
    got = _run(_build_cpu(compute), SPECIALS, SPECIALS.shape)
    with np.errstate(over="ignore"):
        want = reference(SPECIALS).astype(np.float32)
    _assert_same(got, want, atol=1e-30)


@pytest.mark.parametrize("reduce, reference", [(topi.max, np.max), (topi.min, np.min)], ids=["max", "min"])
@pytest.mark.parametrize("where", [0, 5, 63], ids=["nan-first", "nan-inside", "nan-last"])
def test_max_and_min_reductions_return_nan_wherever_it_is(reduce, reference, where):
    rows = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    rows[0, where] = np.nan
    rows[1, where] = np.inf
    rows[2, where] = -np.inf
    x = te.placeholder(rows.shape, "float32", name="x")
    func = te.create_prim_func([x, reduce(x, axis=1)]).with_attr("global_symbol", "main")
    lib = tvm.tirx.build(tvm.IRModule({"main": func}), target=TargetSpec("cpu").tvm_target(), pipeline=tir_pipeline())
    out = tvm.runtime.empty((3,), "float32")
    lib["main"](tvm.runtime.tensor(rows), out)
    _assert_same(out.numpy(), reference(rows, axis=1))


def _module_tree(module):
    yield module
    for imported in module.imports:
        yield from _module_tree(imported)


def test_cuda_kernels_guard_every_min_and_max():
    """No GPU here: the CUDA source of ReLU, clip, a max reduction and softmax (cross-thread reductions
    with warp shuffles) has each min/max in the else branch of a NaN check, `isnan ? ... : max(...)`,
    never bare (CUDA's max on floats is fmaxf, which drops NaN)."""
    from tensorpress.compiler.cuda.toolchain import ensure_cuda_build_support

    ensure_cuda_build_support()
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 256), "float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            outs = [
                bb.emit(relax.op.nn.relu(x)),
                bb.emit(relax.op.clip(x, -1.0, 1.0)),
                bb.emit(relax.op.max(x, axis=1)),
                bb.emit(relax.op.nn.softmax(x, axis=-1)),
            ]
            result = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(result)
    spec = TargetSpec("cuda", "sm_80")
    target = spec.tvm_target()
    with target, tvm.transform.PassContext(opt_level=3):
        executable = tvm.compile(
            bb.get(), target=target, relax_pipeline=_relax_pipeline(spec, target), tir_pipeline=tir_pipeline()
        )
    (cuda,) = [m for m in _module_tree(executable.mod) if m.kind == "cuda"]
    source = cuda.inspect_source("cuda")
    kernels = source[source.index('extern "C" __global__') :]
    calls = re.findall(r"(.{0,3})\b(?:max|min)\(", kernels)
    assert len(calls) >= 4, "expected min/max calls in the kernels"
    assert all(before.endswith(": ") for before in calls), f"a bare min/max: {calls}"
