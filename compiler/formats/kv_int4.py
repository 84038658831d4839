"""int4 KV cache: asymmetric 4-bit codes, two to a byte, with a float16 min and scale per row (per
token, per kv head).

    kv_codes    [L, P, 2, KVH, PS, D/2]  uint8    byte j = code[2j] | code[2j+1] << 4
    kv_min_scale[L, P, 2, KVH, PS, 2]    float16  (min, scale) of the row

    min   = fp16(min(x[0:D]))                          (rounded to nearest; clipped to ±65504)
    scale = fp16(max(0, max(x[0:D]) - min) / 15)       (from the stored min; 0 for a constant row exact in fp16)
    code  = clip(rint((x[d] - min) / scale), 0, 15)    (0 where scale is 0)
    x̂[d]  = min + code[d] · scale                      (fp32, then rounded once to the model dtype)

One page of K for kv head g (D = 8 shown; a byte holds the even element in its low nibble):

                byte 0      byte 1      byte 2      byte 3         kv_min_scale
              hi    lo    hi    lo    hi    lo    hi    lo         min    scale
    row 0   [ c1 | c0 ] [ c3 | c2 ] [ c5 | c4 ] [ c7 | c6 ]        m_0    s_0
    row 1   [ c1 | c0 ] [ c3 | c2 ] [ c5 | c4 ] [ c7 | c6 ]        m_1    s_1
    ...                                                     x̂ = m_r + c · s_r
    row PS-1

One (layer, page, K/V, kv head, row) is one token's row of one head: its own min and max set its grid
of 16 levels, so an outlier token or head costs only its own row's precision. Rounding is half to even.
The round-trip error of an element is at most scale / 2, plus what rounding min and scale to fp16
costs: up to 15 · |scale - scale_fp32| at the row's top (under 0.8 % of a scale) and, at its bottom,
min_fp16 - min(x) when that is positive (half an fp16 ulp of the min).

min and scale are float16, not float32 (int8 keeps a float32 scale), for two reasons. A row of D = 128
codes is 64 bytes, so two fp16 numbers make it 68 bytes (4.25 bits per element) where two fp32 ones
would make 72 (4.5 bits): 6 % more tokens in the same memory, which is what a 4-bit cache is for.
And code · scale is then exact in float32 (4-bit × 11-bit significands), so x̂ = min + code · scale is
one rounding whether a compiler contracts it into a fused multiply-add (nvcc does) or not (numpy): the
reference, the CPU kernel and the GPU kernel read the same x̂ bit for bit. What fp16 costs: an fp32
model's rows beyond fp16's range (|x| > 65504) saturate, and a row whose values span less than
≈ 1e-3 (scale below fp16's normal range, 6e-5) is quantised on a coarser grid than 16 levels
(its absolute error stays below 1e-4).

On CUDA, TVM builds with nvcc's --use_fast_math, whose division is approximate: a code can then
differ by one from the numpy reference at a rounding tie (the CPU and the CPU replay match it bit
for bit), as for int8.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tensorpress.compiler.formats.kv_cache import CacheTensor, KVCacheFormat, page_major_shape
from tensorpress.errors import ShapeError

LEVELS = 15  # codes 0..15
FP16_MAX = 65504.0


def _check_head_dim(head_dim: int) -> None:
    if head_dim % 2:
        raise ShapeError(
            f"the int4 KV cache packs two codes per byte and needs an even head_dim, got {head_dim}; "
            "choose --kv-cache-dtype int8 or fp16 for this model."
        )


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """[..., D] codes 0..15 -> [..., D/2] uint8, element 2j in the low nibble of byte j."""
    codes = codes.astype(np.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """[..., D/2] uint8 -> [..., D] codes 0..15 (the inverse of `pack_nibbles`)."""
    low, high = packed & 0xF, packed >> 4
    return np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


class Int4KVCache(KVCacheFormat):
    """4-bit codes (two per byte) + a float16 (min, scale) per (layer, page, K/V, kv head, row)."""

    name = "int4"
    params_dtype = "float16"

    def cache_tensors(self, num_layers, kv_heads, page_size, head_dim, model_dtype) -> list[CacheTensor]:
        _check_head_dim(head_dim)
        return [
            CacheTensor("kv_codes", page_major_shape(num_layers, kv_heads, page_size, head_dim // 2), "uint8"),
            CacheTensor("kv_min_scale", page_major_shape(num_layers, kv_heads, page_size, 2), self.params_dtype),
        ]

    def code_bits(self, model_dtype: str) -> int:
        return 4

    def quantize(self, rows: np.ndarray, model_dtype: str) -> tuple[np.ndarray, ...]:
        x = np.asarray(rows).astype(np.float32)
        _check_head_dim(x.shape[-1])
        f16_max = np.float32(FP16_MAX)
        low = np.clip(x.min(axis=-1), -f16_max, f16_max).astype(np.float16)
        low32 = low.astype(np.float32)
        span = np.maximum((x.max(axis=-1) - low32) / np.float32(LEVELS), np.float32(0))
        scale = np.minimum(span, f16_max).astype(np.float16)
        step = scale.astype(np.float32)[..., None]
        safe = np.where(step > 0, step, np.float32(1))
        codes = np.where(step > 0, np.clip(np.rint((x - low32[..., None]) / safe), 0, LEVELS), 0)
        return pack_nibbles(codes), np.stack([low, scale], axis=-1)

    def dequantize(self, stored: Sequence[np.ndarray], model_dtype: str) -> np.ndarray:
        packed, min_scale = stored
        codes = unpack_nibbles(packed).astype(np.float32)
        low = min_scale[..., 0:1].astype(np.float32)
        step = min_scale[..., 1:2].astype(np.float32)
        return (codes * step + low).astype(model_dtype)

    def append_func(self, kv_heads, head_dim, page_size, model_dtype):
        from tvm import tirx
        from tvm.script import tirx as T

        _check_head_dim(head_dim)
        KVH, D, PS, dtype = kv_heads, head_dim, page_size, model_dtype
        DB = D // 2  # bytes per row

        def code(x, low, step):
            """The 4-bit code of x (as uint8) in a row of this stored min and scale."""
            level = tirx.nearbyint((x.astype("float32") - low.astype("float32")) / step.astype("float32"))
            clipped = T.max(T.min(level, T.float32(LEVELS)), T.float32(0))
            return T.if_then_else(step.astype("float32") > T.float32(0), clipped, T.float32(0)).astype("uint8")

        @T.prim_func(private=True, s_tir=True)
        def kv_append(
            var_codes: T.handle,
            var_min_scale: T.handle,
            var_k: T.handle,
            var_v: T.handle,
            var_positions: T.handle,
            var_seq_slot: T.handle,
            var_block_table: T.handle,
            layer: T.int64,
        ):
            T.func_attr({"tirx.noalias": True})
            L, P, N, B, M = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            codes = T.match_buffer(var_codes, (L, P, 2, KVH, PS, DB), "uint8")
            min_scale = T.match_buffer(var_min_scale, (L, P, 2, KVH, PS, 2), "float16")
            k = T.match_buffer(var_k, (N, KVH, D), dtype)
            v = T.match_buffer(var_v, (N, KVH, D), dtype)
            positions = T.match_buffer(var_positions, (N,), "int32")
            seq_slot = T.match_buffer(var_seq_slot, (N,), "int32")
            block_table = T.match_buffer(var_block_table, (B, M), "int32")
            with T.sblock("root"):
                row_min = T.sblock_alloc_buffer((N, KVH, 2), "float32")
                row_max = T.sblock_alloc_buffer((N, KVH, 2), "float32")
                for n, g, kv, d in T.grid(N, KVH, 2, D):
                    with T.sblock("row_min"):
                        vn, vg, vkv, vd = T.axis.remap("SSSR", [n, g, kv, d])
                        with T.init():
                            row_min[vn, vg, vkv] = T.max_value("float32")
                        row_min[vn, vg, vkv] = T.min(
                            row_min[vn, vg, vkv],
                            T.if_then_else(vkv == 0, k[vn, vg, vd], v[vn, vg, vd]).astype("float32"),
                        )
                for n, g, kv, d in T.grid(N, KVH, 2, D):
                    with T.sblock("row_max"):
                        vn, vg, vkv, vd = T.axis.remap("SSSR", [n, g, kv, d])
                        with T.init():
                            row_max[vn, vg, vkv] = T.min_value("float32")
                        row_max[vn, vg, vkv] = T.max(
                            row_max[vn, vg, vkv],
                            T.if_then_else(vkv == 0, k[vn, vg, vd], v[vn, vg, vd]).astype("float32"),
                        )
                for n, g, kv in T.grid(N, KVH, 2):
                    with T.sblock("row_min_scale"):
                        vn, vg, vkv = T.axis.remap("SSS", [n, g, kv])
                        T.reads(
                            positions[vn], seq_slot[vn], block_table[seq_slot[vn], 0:M],
                            row_min[vn, vg, vkv], row_max[vn, vg, vkv],
                        )  # fmt: skip
                        T.writes(min_scale[layer, 0:P, vkv, vg, 0:PS, 0:2])
                        params_page: T.let[T.int32] = block_table[seq_slot[vn], positions[vn] // PS]
                        params_row: T.let[T.int32] = positions[vn] % PS
                        low: T.let[T.float16] = T.max(
                            T.min(row_min[vn, vg, vkv], T.float32(FP16_MAX)), T.float32(-FP16_MAX)
                        ).astype("float16")
                        span: T.let[T.float32] = T.max(
                            (row_max[vn, vg, vkv] - low.astype("float32")) / T.float32(LEVELS), T.float32(0)
                        )
                        min_scale[layer, params_page, vkv, vg, params_row, 0] = low
                        min_scale[layer, params_page, vkv, vg, params_row, 1] = T.min(span, T.float32(FP16_MAX)).astype(
                            "float16"
                        )
                for n, g, j in T.grid(N, KVH, DB):
                    with T.sblock("append"):
                        vn, vg, vj = T.axis.remap("SSS", [n, g, j])
                        T.reads(
                            positions[vn], seq_slot[vn], block_table[seq_slot[vn], 0:M],
                            k[vn, vg, vj * 2 : vj * 2 + 2], v[vn, vg, vj * 2 : vj * 2 + 2],
                            min_scale[layer, 0:P, 0:2, vg, 0:PS, 0:2],
                        )  # fmt: skip
                        T.writes(codes[layer, 0:P, 0:2, vg, 0:PS, vj])
                        page: T.let[T.int32] = block_table[seq_slot[vn], positions[vn] // PS]
                        row: T.let[T.int32] = positions[vn] % PS
                        k_low: T.let[T.float16] = min_scale[layer, page, 0, vg, row, 0]
                        k_step: T.let[T.float16] = min_scale[layer, page, 0, vg, row, 1]
                        v_low: T.let[T.float16] = min_scale[layer, page, 1, vg, row, 0]
                        v_step: T.let[T.float16] = min_scale[layer, page, 1, vg, row, 1]
                        codes[layer, page, 0, vg, row, vj] = code(k[vn, vg, vj * 2], k_low, k_step) | (
                            code(k[vn, vg, vj * 2 + 1], k_low, k_step) << T.uint8(4)
                        )
                        codes[layer, page, 1, vg, row, vj] = code(v[vn, vg, vj * 2], v_low, v_step) | (
                            code(v[vn, vg, vj * 2 + 1], v_low, v_step) << T.uint8(4)
                        )

        return kv_append

    def read(self, cache, layer, page, kv, head, row, d, dtype):
        codes, min_scale = cache
        byte = codes[layer, page, kv, head, row, d // 2].astype("int32")
        code = (byte >> ((d % 2) * 4).astype("int32")) & 15
        low = min_scale[layer, page, kv, head, row, 0].astype("float32")
        step = min_scale[layer, page, kv, head, row, 1].astype("float32")
        return (code.astype("float32") * step + low).astype(dtype)
