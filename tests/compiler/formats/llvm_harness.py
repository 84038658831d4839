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


def build_kv_kernels(funcs: dict) -> tvm.runtime.Module:
    """One llvm module of the {name: PrimFunc} KV kernels, scheduled by the KV attention rules as the
    compiler schedules them."""
    from tvm.s_tir import dlight as dl

    from tensorpress.schedules.kv_attention import kv_attention_rules

    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    with target:
        return tvm.compile(dl.ApplyDefaultSchedule(*kv_attention_rules())(mod), target=target)


def build_kv_append_and_read(fmt, read_all, kv_heads: int, head_dim: int, page_size: int, dtype: str):
    """One llvm module holding the KV format's append kernel ("append") and a test's `read_all` PrimFunc
    ("read"), scheduled by the KV attention rules as the compiler schedules them."""
    from tensorpress.schedules.kv_attention import kv_append_func

    return build_kv_kernels({"append": kv_append_func(fmt, kv_heads, head_dim, page_size, dtype), "read": read_all})


def zero_cache_arrays(tensors, pages: int, quantised_pages: int) -> list[np.ndarray]:
    """Zeroed numpy arrays of KV cache tensors, their symbolic page counts set."""
    sizes = {"num_pages": pages, "num_quantised_pages": quantised_pages}
    return [np.zeros([sizes.get(d, d) for d in t.shape], t.dtype) for t in tensors]  # type: ignore[call-overload]


def page_read_func(fmt, dtype: str, shape: tuple[int, int, int, int], entries: int, pages: int, quantised_pages: int):
    """(PrimFunc, cache tensors): out_kv[e, l, g, r, d] = the format's page read of row r of block-table
    entry e (a te compute over the whole cache); shape = (layers, kv heads, page size, head dim)."""
    from tvm import te

    layers, kv_heads, page_size, head_dim = shape
    tensors = fmt.cache_tensors(layers, kv_heads, page_size, head_dim, dtype)
    sizes = {"num_pages": pages, "num_quantised_pages": quantised_pages}
    cache = [te.placeholder([sizes.get(d, d) for d in t.shape], t.dtype, t.name) for t in tensors]  # type: ignore[call-overload]
    table = te.placeholder((entries,), "int32", "table")

    def reader(kv):
        return lambda e, layer, g, r, d: fmt.read(cache, layer, table[e], kv, g, r, d, dtype)

    outs = [te.compute((entries, *shape), reader(kv), name=f"read_{kv}") for kv in (0, 1)]
    return te.create_prim_func([*cache, table, *outs]), tensors


def assert_tagged_reads_bit_for_bit(read_func, pages, stored, table, references, group: int) -> None:
    """Run `page_read_func`'s PrimFunc over the cache (pages, *stored) and a block table of tagged entries:
    an entry e >= 0 must read full-precision page e as it is, an entry e < 0 row sub of quantised page q
    (-1 - e = q · group + sub) as references[q, layer, head] = (keys, values) of that page says."""
    lib = tvm.compile(tvm.IRModule({"read": read_func.with_attr("global_symbol", "read")}), target="llvm")
    layers, _, _, kv_heads, page_size, head_dim = pages.shape
    outs = [tvm.runtime.empty((len(table), layers, kv_heads, page_size, head_dim), pages.dtype) for _ in range(2)]
    lib["read"](*[tvm.runtime.tensor(a) for a in (pages, *stored, table)], *outs)
    for kv, out in enumerate(o.numpy() for o in outs):
        for e, entry in enumerate(table):
            for layer in range(layers):
                for g in range(kv_heads):
                    if entry >= 0:
                        want = pages[layer, entry, kv, g]
                    else:
                        q, sub = divmod(-1 - int(entry), group)
                        want = references[q, layer, g][kv][sub * page_size : (sub + 1) * page_size]
                    np.testing.assert_array_equal(out[e, layer, g].view(np.uint8), want.view(np.uint8))
