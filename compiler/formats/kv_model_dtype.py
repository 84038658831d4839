"""The unquantised KV cache: K/V rows stored as they are, in the model dtype ("auto") or in fp16/fp32.

    kv_pages[L, P, 2, KVH, PS, D]   (page dtype: the model's for "auto", else float16 / float32)

    layer l ─┬─ page 0 ─┬─ K ─┬─ kv head 0 ─ [PS rows × D]   row r = token at position page_slot*PS + r
             │          │     └─ kv head 1 ─ [PS rows × D]
             │          └─ V ─── ... same ...
             ├─ page 1 ... (a page holds PS consecutive tokens of one sequence, in every layer)

Append copies each row (cast to the page dtype when it differs from the model's), read returns the
element (cast back). With "auto" the kernels are exactly the ones the cache has always had.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tensorpress.compiler.formats.kv_cache import CacheTensor, KVCacheFormat, page_major_shape


class ModelDtypeKVCache(KVCacheFormat):
    """Pages in `dtype` ("float16", "float32"), or in the model's dtype when dtype is None."""

    def __init__(self, name: str, dtype: str | None):
        self.name = name
        self.dtype = dtype

    def page_dtype(self, model_dtype: str) -> str:
        return self.dtype or model_dtype

    def cache_tensors(self, num_layers, kv_heads, page_size, head_dim, model_dtype) -> list[CacheTensor]:
        shape = page_major_shape(num_layers, kv_heads, page_size, head_dim)
        return [CacheTensor("kv_pages", shape, self.page_dtype(model_dtype))]

    def code_bits(self, model_dtype: str) -> int:
        return 8 * np.dtype(self.page_dtype(model_dtype)).itemsize

    def quantize(self, rows: np.ndarray, model_dtype: str) -> tuple[np.ndarray, ...]:
        return (rows.astype(self.page_dtype(model_dtype)),)

    def dequantize(self, stored: Sequence[np.ndarray], model_dtype: str) -> np.ndarray:
        (pages,) = stored
        return pages.astype(model_dtype)

    def append_func(self, kv_heads, head_dim, page_size, model_dtype):
        from tvm.script import tirx as T

        KVH, D, PS = kv_heads, head_dim, page_size
        dtype, page_dtype = model_dtype, self.page_dtype(model_dtype)

        @T.prim_func(private=True, s_tir=True)
        def kv_append(
            var_pages: T.handle,
            var_k: T.handle,
            var_v: T.handle,
            var_positions: T.handle,
            var_seq_slot: T.handle,
            var_block_table: T.handle,
            layer: T.int64,
        ):
            T.func_attr({"tirx.noalias": True})
            L, P, N, B, M = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            pages = T.match_buffer(var_pages, (L, P, 2, KVH, PS, D), page_dtype)
            k = T.match_buffer(var_k, (N, KVH, D), dtype)
            v = T.match_buffer(var_v, (N, KVH, D), dtype)
            positions = T.match_buffer(var_positions, (N,), "int32")
            seq_slot = T.match_buffer(var_seq_slot, (N,), "int32")
            block_table = T.match_buffer(var_block_table, (B, M), "int32")
            for n, g, d in T.grid(N, KVH, D):
                with T.sblock("append"):
                    vn, vg, vd = T.axis.remap("SSS", [n, g, d])
                    T.reads(positions[vn], seq_slot[vn], block_table[seq_slot[vn], 0:M], k[vn, vg, vd], v[vn, vg, vd])
                    T.writes(pages[layer, 0:P, 0:2, vg, 0:PS, vd])
                    page: T.let[T.int32] = block_table[seq_slot[vn], positions[vn] // PS]
                    row: T.let[T.int32] = positions[vn] % PS
                    pages[layer, page, 0, vg, row, vd] = k[vn, vg, vd].astype(page_dtype)
                    pages[layer, page, 1, vg, row, vd] = v[vn, vg, vd].astype(page_dtype)

        return kv_append

    def read(self, cache, layer, page, kv, head, row, d, dtype):
        (pages,) = cache
        return pages[layer, page, kv, head, row, d].astype(dtype)
