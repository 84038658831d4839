"""sign legalised with LEGALIZE_KEEPING_NAN: NaN stays NaN (as numpy, torch and onnxruntime), ±Inf give ±1."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from tensorpress.compiler.passes.legalize_sign_keeping_nan import LEGALIZE_KEEPING_NAN


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32"])
def test_sign_keeps_nan(dtype):
    values = [np.nan, np.inf, -np.inf, 0.0, -0.0, 2.5, -3.0] if dtype != "int32" else [0, 3, -4]
    x_np = np.array(values, dtype)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_np.shape, dtype))
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(relax.op.sign(x)))
    mod = relax.transform.LegalizeOps(LEGALIZE_KEEPING_NAN)(bb.get())
    executable = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x_np)).numpy()
    np.testing.assert_array_equal(got, np.sign(x_np))  # NaN == NaN here: assert_array_equal matches NaNs
