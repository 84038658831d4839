"""int2-oscar KV cache (OSCAR, 2026): keys and values rotated by calibrated per-KV-head rotations, then
quantised per token, asymmetric 2-bit with a percentile clip; the sink and the recent window full precision
(`kv_page_quantised.py`).

The rotations R_K, R_V [D, D] (orthonormal, one pair per layer and kv head) come from calibration
(`compiler/calibration/kv_rotations.py`) and are model parameters: the decoder applies them around the
cache (`frontend/decoders/paged_attention.py`: k ← R_K k and q ← R_K q after RoPE, v ← R_V v, the attention
output ← R_Vᵀ o), so every page, full precision or 2-bit, holds rotated K and V and q·k is unchanged.
This file only stores what it is given.

The percentile clip of one token's row x[0..D-1] with fraction p (0.96 keys, 0.92 values): let r =
floor(p · (D - 1)) and s the row sorted ascending (ties by channel index); the row is quantised on the
range [s[D-1-r], s[r]], so D-1-r values at each end fall outside and take code 0 or 3. With lo, hi that
range: min = fp16(lo), scale = fp16(max(0, hi - min) / 3), code = clip(rint((x - min) / scale), 0, 3)
(0 where scale is 0), x̂ = min + code · scale (`kv_int2_kitty.asymmetric_quantize`'s rule, its range
clipped). At D = 128: r = 121 keys (6 values clipped at each end), 116 values (11 at each end).

One quantised page (QP tokens) of one kv head, D = 8, QP = 2:

    codes     [2, QP, D/4]  uint8     K/V  token   ch 3 2 1 0    ch 7 6 5 4     2 bits each, channel
                                      K    0     [ c c c c ]   [ c c c c ]     4j + i in bits 2i..2i+1
                                      K    1     [ ...     ]   [ ...     ]     of byte j
                                      V    0, 1  (the same, values)
    min_scale [2, QP, 2]    float16   K/V, token: (min, scale)

In the cache (`Int2OscarKVCache`) the quantised pool keeps the K/V axis before the head, as kv_pages does:

    kv_q_codes      [L, Q, 2, KVH, QP, D/4]  uint8
    kv_q_min_scale  [L, Q, 2, KVH, QP, 2]    float16

Bytes of a page per kv head: 2 · (QP·D/4 + 4·QP), so 2 + 32/D bits per element (2.25 at D = 128;
OSCAR's paper reports 2.28 with groups of 128). Per-token statistics need no group of pages, so a quantised
page is one runtime page (QP = 16, G = 1) by default: a page is quantised as soon as it leaves the window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tensorpress.compiler.formats.kv_cache import CacheTensor
from tensorpress.compiler.formats.kv_int2_kitty import FP16_MAX, pack_2bit, unpack_2bit
from tensorpress.compiler.formats.kv_page_quantised import NUM_QUANTISED_PAGES, PageQuantisedKVFormat
from tensorpress.errors import ConfigError

KEY_CLIP = 0.96
VALUE_CLIP = 0.92


def clip_rank(head_dim: int, fraction: float) -> int:
    """r = floor(fraction · (D - 1)): the rank (0-based, ascending) of a row's clipped maximum; its clipped
    minimum has rank D - 1 - r. The small epsilon keeps 0.96 · 25 = 24 from flooring to 23."""
    return int(math.floor(fraction * (head_dim - 1) + 1e-9))


def clipped_range(rows: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) float32 [T] of rows [T, D]: the values of rank D-1-r and r of each row (stable order)."""
    x = np.asarray(rows, np.float32)
    r = clip_rank(x.shape[1], fraction)
    order = np.argsort(x, axis=1, kind="stable")  # ties by channel index, as the kernel ranks them
    ranked = np.take_along_axis(x, order, axis=1)
    return ranked[:, x.shape[1] - 1 - r], ranked[:, r]


def quantize_rows(rows: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-token clipped asymmetric 2-bit (module docstring): rows [T, D] -> (codes [T, D] uint8 0..3,
    min_scale [T, 2] float16)."""
    x = np.asarray(rows, np.float32)
    lo, hi = clipped_range(x, fraction)
    low = np.clip(lo, -FP16_MAX, FP16_MAX).astype(np.float16)
    low32 = low.astype(np.float32)
    scale = np.minimum(np.maximum((hi - low32) / np.float32(3), np.float32(0)), FP16_MAX).astype(np.float16)
    step = scale.astype(np.float32)[:, None]
    safe = np.where(step > 0, step, np.float32(1))
    codes = np.where(step > 0, np.clip(np.rint((x - low32[:, None]) / safe), 0, 3), 0)
    return codes.astype(np.uint8), np.stack([low, scale], axis=-1)


def dequantize_rows(codes: np.ndarray, min_scale: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """min + code · scale in float32, rounded once to `dtype` (what the cache's read gives)."""
    step, low = min_scale[:, 1:2].astype(np.float32), min_scale[:, 0:1].astype(np.float32)
    return (codes.astype(np.float32) * step + low).astype(dtype)


def bits_per_element(head_dim: int) -> float:
    """Stored bits per K/V element of a quantised page, the per-token min and scale included."""
    return 2 + 32 / head_dim


@dataclass(frozen=True)
class Int2OscarKVCache(PageQuantisedKVFormat):
    """int2-oscar pages (module docstring): per-token clipped 2-bit of rotated K and V, `sink` and `window`
    tokens full precision, quantised pages of `page_tokens` tokens. The decoder rotates K, V, q and the
    attention output by the calibrated rotations this format asks for (`attention_rotations`)."""

    sink: int = 32
    window: int = 128
    page_tokens: int = 16
    key_clip: float = KEY_CLIP
    value_clip: float = VALUE_CLIP
    # CPU: q·k over 2-bit rows as int8 x 2-bit dot products (int8_query_keys); None: where they are faster
    int8_query: bool | None = None
    name: str = "int2-oscar"
    attention_rotations: ClassVar[bool] = True  # R_K and R_V per layer and kv head, model parameters

    def __post_init__(self):
        for field, value in (("sink", self.sink), ("window", self.window), ("page_tokens", self.page_tokens)):
            if not isinstance(value, int) or value < (1 if field == "page_tokens" else 0):
                raise ConfigError(f"int2-oscar {field} must be a whole number of tokens, got {value!r}.")
        for field, fraction in (("key_clip", self.key_clip), ("value_clip", self.value_clip)):
            if not 0.5 <= fraction <= 1:
                raise ConfigError(f"int2-oscar {field} must be a fraction between 0.5 and 1, got {fraction!r}.")

    def with_options(self, boost_fraction=None, **options) -> Int2OscarKVCache:
        """This format with the KVCacheConfig's options (sink, window, page_tokens) set."""
        if boost_fraction is not None:
            raise ConfigError("KVCacheConfig boost_fraction applies to int2-kitty, not int2-oscar; drop it.")
        given = {k: v for k, v in options.items() if v is not None}
        return Int2OscarKVCache(**{**vars(self), **given}) if given else self

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % 4:
            raise ConfigError(
                f"int2-oscar packs 4 channels a byte: head_dim {head_dim} must be a multiple of 4; choose "
                "--kv-cache-dtype int4 for this model."
            )

    def quantised_tensors(self, num_layers, kv_heads, head_dim, model_dtype) -> list[CacheTensor]:
        self.check_head_dim(head_dim)
        lq = (num_layers, NUM_QUANTISED_PAGES)
        return [
            CacheTensor("kv_q_codes", (*lq, 2, kv_heads, self.page_tokens, head_dim // 4), "uint8"),
            CacheTensor("kv_q_min_scale", (*lq, 2, kv_heads, self.page_tokens, 2), "float16"),
        ]

    def quantised_code_bits(self) -> int:
        return 2

    def quantize_page(self, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, ...]:
        """Rotated keys, values [QP, D] -> (codes [2, QP, D/4], min_scale [2, QP, 2])."""
        self.check_head_dim(keys.shape[1])
        k_codes, k_ms = quantize_rows(keys, self.key_clip)
        v_codes, v_ms = quantize_rows(values, self.value_clip)
        return np.stack([pack_2bit(k_codes), pack_2bit(v_codes)]), np.stack([k_ms, v_ms])

    def dequantize_page(self, stored: Sequence[np.ndarray], model_dtype: str) -> tuple[np.ndarray, np.ndarray]:
        codes, min_scale = stored
        k, v = (dequantize_rows(unpack_2bit(codes[i]), min_scale[i], model_dtype) for i in (0, 1))
        return k, v

    def quantize_pages_func(self, kv_heads, head_dim, page_size, model_dtype):
        self.check_head_dim(head_dim)
        ranks = (clip_rank(head_dim, self.key_clip), clip_rank(head_dim, self.value_clip))
        return _quantize_pages_func(kv_heads, head_dim, page_size, self.page_tokens, ranks, model_dtype)

    def int8_query_keys(self, head_dim: int):
        """The key plane (codes[.., 0, ..] as words) and per-token (scale, min) for the int8-query scores."""
        from tvm import tirx

        from tensorpress.schedules.cpu.int8_query_scores import ROWS, Int8QueryKeys, key_codes_row, strided_load

        def row_affine(quantised, layer, qpage, head, row, part):  # part 0: scale, 1: min
            rows = strided_load(quantised[1], [layer, qpage, 0, head, row, 1 - part], 4)
            return tirx.Cast(f"float32x{ROWS}", rows)

        def rows_to_prefetch(quantised, layer, qpage, head, row):  # 8 rows: 4 lines of codes, 1 of scales
            codes, min_scale = quantised
            lines = [codes[layer, qpage, kv, head, row + 2 * i, 0] for kv in (0, 1) for i in range(4)]
            return lines + [min_scale[layer, qpage, kv, head, row, 0] for kv in (0, 1)]

        return Int8QueryKeys("token", key_codes_row, row_affine=row_affine, rows_to_prefetch=rows_to_prefetch)

    def read_quantised(self, quantised, layer, page, kv, head, row, d, dtype):
        codes, min_scale = quantised
        byte = codes[layer, page, kv, head, row, d // 4].astype("int32")
        code = (byte >> ((d % 4) * 2).astype("int32")) & 3
        minimum, step = min_scale[layer, page, kv, head, row, 0], min_scale[layer, page, kv, head, row, 1]
        return (code.astype("float32") * step.astype("float32") + minimum.astype("float32")).astype(dtype)


def _quantize_pages_func(
    kv_heads: int, head_dim: int, page_size: int, page_tokens: int, ranks: tuple[int, int], dtype: str
):
    """kv_quantize_pages(pages, codes, min_scale, src[K, G], dst[K]): for every layer, K/V and kv head, the
    QP rows of fp pages src[k, :] quantised into page dst[k] exactly as `quantize_rows` does. Blocks, each
    over (k, layer, K/V, kv head, token, ...): rank (of each channel in its row: a count over the row, ties
    by index), clip_lo / clip_hi (the values of rank D-1-r and r), min_scale, codes."""
    from tvm import tirx
    from tvm.script import tirx as T

    KVH, D, PS, QP = kv_heads, head_dim, page_size, page_tokens
    G, DB = QP // PS, D // 4
    f16_max = float(FP16_MAX)
    key_rank, value_rank = ranks

    def code(x, low32, step):
        """The 2-bit code of x (uint8): clip(rint((x - min) / scale), 0, 3), 0 where scale is 0."""
        level = tirx.nearbyint((x.astype("float32") - low32) / step)
        clipped = T.max(T.min(level, T.float32(3)), T.float32(0))
        return T.if_then_else(step > T.float32(0), clipped, T.float32(0)).astype("uint8")

    def codes_byte(pages, layer, fp, kv, g, t, j, low32, step):
        """Byte j of row t: the codes of channels 4j..4j+3, channel 4j + i in bits 2i..2i+1."""
        parts = [code(pages[layer, fp, kv, g, t % PS, j * 4 + i], low32, step) for i in range(4)]
        byte = parts[0] & T.uint8(3)
        for i in range(1, 4):
            byte = byte | ((parts[i] & T.uint8(3)) << T.uint8(2 * i))
        return byte

    @T.prim_func(private=True, s_tir=True)
    def kv_quantize_pages(
        var_pages: T.handle, var_codes: T.handle, var_ms: T.handle, var_src: T.handle, var_dst: T.handle
    ):
        T.func_attr({"tirx.noalias": True})
        L, P, Q, K = T.int64(), T.int64(), T.int64(), T.int64()
        pages = T.match_buffer(var_pages, (L, P, 2, KVH, PS, D), dtype)
        codes = T.match_buffer(var_codes, (L, Q, 2, KVH, QP, DB), "uint8")
        min_scale = T.match_buffer(var_ms, (L, Q, 2, KVH, QP, 2), "float16")
        src = T.match_buffer(var_src, (K, G), "int32")
        dst = T.match_buffer(var_dst, (K,), "int32")
        with T.sblock("root"):
            rank = T.sblock_alloc_buffer((K, L, 2, KVH, QP, D), "int32")
            clip_lo = T.sblock_alloc_buffer((K, L, 2, KVH, QP), "float32")
            clip_hi = T.sblock_alloc_buffer((K, L, 2, KVH, QP), "float32")
            for k, ly, kv, g, t, d, e in T.grid(K, L, 2, KVH, QP, D, D):
                with T.sblock("rank"):  # channels below d in the row's stable ascending order
                    vk, vl, vkv, vg, vt, vd, ve = T.axis.remap("SSSSSSR", [k, ly, kv, g, t, d, e])
                    with T.init():
                        rank[vk, vl, vkv, vg, vt, vd] = 0
                    xe: T.let[T.float32] = pages[vl, src[vk, vt // PS], vkv, vg, vt % PS, ve].astype("float32")
                    xd: T.let[T.float32] = pages[vl, src[vk, vt // PS], vkv, vg, vt % PS, vd].astype("float32")
                    rank[vk, vl, vkv, vg, vt, vd] = rank[vk, vl, vkv, vg, vt, vd] + T.Cast(
                        "int32", xe < xd or (xe == xd and ve < vd)
                    )
            for k, ly, kv, g, t, d in T.grid(K, L, 2, KVH, QP, D):
                with T.sblock("clip_hi"):  # the value of rank r (exactly one channel has it)
                    vk, vl, vkv, vg, vt, vd = T.axis.remap("SSSSSR", [k, ly, kv, g, t, d])
                    with T.init():
                        clip_hi[vk, vl, vkv, vg, vt] = T.min_value("float32")
                    top: T.let[T.int32] = T.if_then_else(vkv == 0, key_rank, value_rank)
                    clip_hi[vk, vl, vkv, vg, vt] = T.max(
                        clip_hi[vk, vl, vkv, vg, vt],
                        T.if_then_else(
                            rank[vk, vl, vkv, vg, vt, vd] == top,
                            pages[vl, src[vk, vt // PS], vkv, vg, vt % PS, vd].astype("float32"),
                            T.min_value("float32"),
                        ),
                    )
            for k, ly, kv, g, t, d in T.grid(K, L, 2, KVH, QP, D):
                with T.sblock("clip_lo"):  # the value of rank D - 1 - r
                    vk, vl, vkv, vg, vt, vd = T.axis.remap("SSSSSR", [k, ly, kv, g, t, d])
                    with T.init():
                        clip_lo[vk, vl, vkv, vg, vt] = T.max_value("float32")
                    bottom: T.let[T.int32] = D - 1 - T.if_then_else(vkv == 0, key_rank, value_rank)
                    clip_lo[vk, vl, vkv, vg, vt] = T.min(
                        clip_lo[vk, vl, vkv, vg, vt],
                        T.if_then_else(
                            rank[vk, vl, vkv, vg, vt, vd] == bottom,
                            pages[vl, src[vk, vt // PS], vkv, vg, vt % PS, vd].astype("float32"),
                            T.max_value("float32"),
                        ),
                    )
            for k, ly, kv, g, t in T.grid(K, L, 2, KVH, QP):
                with T.sblock("min_scale"):
                    vk, vl, vkv, vg, vt = T.axis.remap("SSSSS", [k, ly, kv, g, t])
                    T.reads(dst[vk], clip_lo[vk, vl, vkv, vg, vt], clip_hi[vk, vl, vkv, vg, vt])
                    T.writes(min_scale[vl, 0:Q, vkv, vg, vt, 0:2])
                    low: T.let[T.float16] = T.max(
                        T.min(clip_lo[vk, vl, vkv, vg, vt], T.float32(f16_max)), T.float32(-f16_max)
                    ).astype("float16")
                    min_scale[vl, dst[vk], vkv, vg, vt, 0] = low
                    min_scale[vl, dst[vk], vkv, vg, vt, 1] = T.min(
                        T.max((clip_hi[vk, vl, vkv, vg, vt] - low.astype("float32")) / T.float32(3), T.float32(0)),
                        T.float32(f16_max),
                    ).astype("float16")
            for k, ly, kv, g, t, j in T.grid(K, L, 2, KVH, QP, DB):
                with T.sblock("codes"):
                    vk, vl, vkv, vg, vt, vj = T.axis.remap("SSSSSS", [k, ly, kv, g, t, j])
                    T.reads(dst[vk], src[vk, vt // PS], pages[vl, 0:P, vkv, vg, vt % PS, vj * 4 : vj * 4 + 4],
                            min_scale[vl, 0:Q, vkv, vg, vt, 0:2])  # fmt: skip
                    T.writes(codes[vl, 0:Q, vkv, vg, vt, vj])
                    q: T.let[T.int32] = dst[vk]
                    fp: T.let[T.int32] = src[vk, vt // PS]
                    low32: T.let[T.float32] = min_scale[vl, q, vkv, vg, vt, 0].astype("float32")
                    step: T.let[T.float32] = min_scale[vl, q, vkv, vg, vt, 1].astype("float32")
                    codes[vl, q, vkv, vg, vt, vj] = codes_byte(pages, vl, fp, vkv, vg, vt, vj, low32, step)

    return kv_quantize_pages
