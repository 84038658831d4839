"""int8 KV cache: symmetric int8 codes with one float32 scale per row (per token, per kv head).

    kv_codes [L, P, 2, KVH, PS, D]  int8      code[d] = clip(rint(x[d] / scale), -127, 127)
    kv_scales[L, P, 2, KVH, PS]     float32   scale   = absmax(x[0:D]) / 127   (0 for an all-zero row)

    page p, K, kv head g:   row r   [c0 c1 c2 ... c(D-1)]  ·  s_r     ->  x̂[d] = c_d · s_r
                            row r+1 [ ... D int8 codes ...]  ·  s_r+1

One (layer, page, K/V, kv head, row) is one token's row of one head: its absmax over head_dim sets its
scale, so an outlier token or head costs only its own row's precision. Rounding is half to even
(`rint`, `nearbyint` in TIR); the round-trip error of every element is at most scale / 2.

The scale is float32, not float16: dequantisation (code · scale) is then exact in float32 (8-bit ×
24-bit significands), the error bound holds for any float32 row (an fp16 scale underflows below
absmax ≈ 1e-5 and overflows above 8e6), and it costs 2 bytes more per row than fp16 (1.5 % of a
row of 128 codes). Reads return code · scale rounded once to the model dtype.

On CUDA, TVM builds with nvcc's --use_fast_math, whose division is approximate: a code can then
differ by one from the numpy reference at a rounding tie (the CPU and the CPU replay match it bit
for bit).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tensorpress.compiler.formats.kv_cache import CacheTensor, KVCacheFormat, page_major_shape

QMAX = 127  # symmetric: codes -127..127 (-128 unused)


class Int8KVCache(KVCacheFormat):
    """int8 codes + a float32 scale per (layer, page, K/V, kv head, row) (module docstring)."""

    name = "int8"
    scale_dtype = "float32"

    def cache_tensors(self, num_layers, kv_heads, page_size, head_dim, model_dtype) -> list[CacheTensor]:
        return [
            CacheTensor("kv_codes", page_major_shape(num_layers, kv_heads, page_size, head_dim), "int8"),
            CacheTensor("kv_scales", page_major_shape(num_layers, kv_heads, page_size), self.scale_dtype),
        ]

    def code_bits(self, model_dtype: str) -> int:
        return 8

    def quantize(self, rows: np.ndarray, model_dtype: str) -> tuple[np.ndarray, ...]:
        x = np.asarray(rows).astype(np.float32)
        scale = np.abs(x).max(axis=-1) / np.float32(QMAX)
        safe = np.where(scale > 0, scale, np.float32(1))[..., None]
        codes = np.where(scale[..., None] > 0, np.clip(np.rint(x / safe), -QMAX, QMAX), 0)
        return codes.astype(np.int8), scale.astype(np.float32)

    def dequantize(self, stored: Sequence[np.ndarray], model_dtype: str) -> np.ndarray:
        codes, scales = stored
        return (codes.astype(np.float32) * scales.astype(np.float32)[..., None]).astype(model_dtype)

    def append_func(self, kv_heads, head_dim, page_size, model_dtype):
        from tvm import tirx
        from tvm.script import tirx as T

        KVH, D, PS, dtype = kv_heads, head_dim, page_size, model_dtype

        def code(x, absmax):
            """The int8 code of x in a row of this absmax (0 for an all-zero row)."""
            scale = absmax / T.float32(QMAX)
            rounded = tirx.nearbyint(x.astype("float32") / scale)
            clipped = T.max(T.min(rounded, T.float32(QMAX)), T.float32(-QMAX))
            return T.if_then_else(scale > T.float32(0), clipped, T.float32(0)).astype("int8")

        @T.prim_func(private=True, s_tir=True)
        def kv_append(
            var_codes: T.handle,
            var_scales: T.handle,
            var_k: T.handle,
            var_v: T.handle,
            var_positions: T.handle,
            var_seq_slot: T.handle,
            var_block_table: T.handle,
            layer: T.int64,
        ):
            T.func_attr({"tirx.noalias": True})
            L, P, N, B, M = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            codes = T.match_buffer(var_codes, (L, P, 2, KVH, PS, D), "int8")
            scales = T.match_buffer(var_scales, (L, P, 2, KVH, PS), "float32")
            k = T.match_buffer(var_k, (N, KVH, D), dtype)
            v = T.match_buffer(var_v, (N, KVH, D), dtype)
            positions = T.match_buffer(var_positions, (N,), "int32")
            seq_slot = T.match_buffer(var_seq_slot, (N,), "int32")
            block_table = T.match_buffer(var_block_table, (B, M), "int32")
            with T.sblock("root"):
                absmax = T.sblock_alloc_buffer((N, KVH, 2), "float32")
                for n, g, kv, d in T.grid(N, KVH, 2, D):
                    with T.sblock("row_absmax"):
                        vn, vg, vkv, vd = T.axis.remap("SSSR", [n, g, kv, d])
                        with T.init():
                            absmax[vn, vg, vkv] = T.float32(0)
                        absmax[vn, vg, vkv] = T.max(
                            absmax[vn, vg, vkv],
                            T.abs(T.if_then_else(vkv == 0, k[vn, vg, vd], v[vn, vg, vd]).astype("float32")),
                        )
                for n, g, kv in T.grid(N, KVH, 2):
                    with T.sblock("row_scale"):
                        vn, vg, vkv = T.axis.remap("SSS", [n, g, kv])
                        T.reads(positions[vn], seq_slot[vn], block_table[seq_slot[vn], 0:M], absmax[vn, vg, vkv])
                        T.writes(scales[layer, 0:P, vkv, vg, 0:PS])
                        scale_page: T.let[T.int32] = block_table[seq_slot[vn], positions[vn] // PS]
                        scale_row: T.let[T.int32] = positions[vn] % PS
                        scales[layer, scale_page, vkv, vg, scale_row] = absmax[vn, vg, vkv] / T.float32(QMAX)
                for n, g, d in T.grid(N, KVH, D):
                    with T.sblock("append"):
                        vn, vg, vd = T.axis.remap("SSS", [n, g, d])
                        T.reads(
                            positions[vn], seq_slot[vn], block_table[seq_slot[vn], 0:M],
                            k[vn, vg, vd], v[vn, vg, vd], absmax[vn, vg, 0:2],
                        )  # fmt: skip
                        T.writes(codes[layer, 0:P, 0:2, vg, 0:PS, vd])
                        page: T.let[T.int32] = block_table[seq_slot[vn], positions[vn] // PS]
                        row: T.let[T.int32] = positions[vn] % PS
                        codes[layer, page, 0, vg, row, vd] = code(k[vn, vg, vd], absmax[vn, vg, 0])
                        codes[layer, page, 1, vg, row, vd] = code(v[vn, vg, vd], absmax[vn, vg, 1])

        return kv_append

    def read(self, cache, layer, page, kv, head, row, d, dtype):
        codes, scales = cache
        return (codes[layer, page, kv, head, row, d].astype("float32") * scales[layer, page, kv, head, row]).astype(
            dtype
        )
