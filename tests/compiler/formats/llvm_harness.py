"""Shared by the format tests: build a PrimFunc for llvm, run it on numpy arrays, compare bit patterns."""

from __future__ import annotations

import numpy as np
import tvm

UINT = {"float32": np.uint32, "float16": np.uint16}  # the bit patterns of a float dtype


def build(func):
    return tvm.compile(tvm.IRModule({"main": func}), target="llvm")["main"]


def run(func, arrays, out_shape, out_dtype):
    """func(*arrays, out) on the CPU; returns out as numpy."""
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]
    out = tvm.runtime.empty(out_shape, out_dtype, dev)
    func(*args, out)
    return out.numpy()
