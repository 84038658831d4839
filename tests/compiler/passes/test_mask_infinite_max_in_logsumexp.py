"""ReduceLogSumExp as the ONNX frontend writes it, with MaskInfiniteMaxInLogSumExp: rows holding +Inf,
-Inf, only -Inf, and NaN give what torch.logsumexp gives."""

from __future__ import annotations

import numpy as np
import torch
import tvm
from tvm import relax

from tensorpress.compiler.passes.mask_infinite_max_in_logsumexp import mask_infinite_max_in_logsumexp
from tensorpress.imported_model import ImportedModel


def _frontend_logsumexp(shape):
    """The ONNX frontend's ReduceLogSumExp (tvm/relax/frontend/onnx, _impl_v13), keepdims=1, last axis."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            m = bb.emit(relax.op.max(x, [-1], True))
            e = bb.emit(relax.op.exp(relax.op.subtract(x, m)))
            s = bb.emit(relax.op.sum(e, [-1], True))
            out = bb.emit_output(relax.op.add(relax.op.log(s), m))
        bb.emit_func_output(out)
    return bb.get()


def test_logsumexp_of_rows_with_inf_matches_torch():
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    x[0, 2] = np.inf
    x[1, :] = -np.inf
    x[2, 1], x[2, 4] = np.inf, -np.inf
    x[3, 6] = np.nan
    mod = mask_infinite_max_in_logsumexp(ImportedModel(_frontend_logsumexp(x.shape), {}, [], [])).mod
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = torch.logsumexp(torch.from_numpy(x), -1, keepdim=True).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-5, equal_nan=True)  # ±Inf compare equal by position
