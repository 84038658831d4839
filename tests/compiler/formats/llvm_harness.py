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


def build_kv_append_and_read(fmt, read_all, kv_heads: int, head_dim: int, page_size: int, dtype: str):
    """One llvm module holding the KV format's append kernel ("append") and a test's `read_all` PrimFunc
    ("read"), scheduled by the KV attention rules as the compiler schedules them."""
    from tvm.s_tir import dlight as dl

    from tensorpress.schedules.kv_attention import kv_append_func, kv_attention_rules

    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    append = kv_append_func(fmt, kv_heads, head_dim, page_size, dtype)
    mod = tvm.IRModule(
        {"append": append.with_attr("global_symbol", "append"), "read": read_all.with_attr("global_symbol", "read")}
    )
    with target:
        mod = dl.ApplyDefaultSchedule(*kv_attention_rules())(mod)
        return tvm.compile(mod, target=target)
