"""int2-kitty KV cache (Kitty, 2025): 2-bit pages, keys per channel with the strongest channels boosted to
4 bits, values per token; the sink and the recent window full precision (`kv_page_quantised.py`).

One quantised page holds QP consecutive tokens (QP = 128 by default, Kitty's group: the per-channel
metadata of a page is then 0.27 bits per element) of one kv head, D channels. Keys are quantised per
channel over the page's tokens, values per token over the channels; both asymmetric 2-bit (x̂ = min +
code · scale, min and scale fp16, rounded as in `kv_int4.py`). In each key page the B = f · D channels
with the largest sum of |K| over the page (summed in token order in fp32; ties: lower channel) get 4
bits instead: their codes are split into the 2-bit low plane that every channel has and a 2-bit high
plane of the boosted channels only, so dequantisation is one uniform rule, code = low | high << 2 (high
= 0 for the others), and the channel's scale says which grid it is on (range / 15 or range / 3).

One page of one kv head (D = 8, QP = 4, f = 0.25: B = 2 boosted channels, here 1 and 6):

    k_low   [QP, D/4]  uint8     channel:   3  2  1  0     7  6  5  4      (2 bits each, channel 4j in
                                 token 0  [ l  l  l  l ] [ l  l  l  l ]      the low bits of byte j)
                                 token 1  [ ...         ] [ ...       ]
    k_high  [QP, B/4]  uint8     token t  [ -  -  h6 h1 ]                   (boosted channels in index
    k_index [B]        uint8     [1, 6]                                      order; B a multiple of 4)
    k_min_scale [D, 2] float16   per channel: (min over the page, scale)    scale = range/15 if boosted
                                                                             else range/3
    v_codes [QP, D/4]  uint8     token t  [ c3 c2 c1 c0 ] [ c7 c6 c5 c4 ]   per token, 2 bits
    v_min_scale [QP, 2] float16  per token: (min over D, range / 3)

In the cache (`Int2KittyKVCache`) the quantised pool stores, per (layer, quantised page, kv head), k_low
and v_codes together as kv_q_codes[.., 2, KVH, QP, D/4], and instead of k_index the channel -> high-plane
slot map (D bytes, 255 = not boosted), so a read finds a channel's high bits without a search:

    kv_q_codes          [L, Q, 2, KVH, QP, D/4]  uint8     (K low plane | V codes)
    kv_q_key_high       [L, Q, KVH, QP, B/4]     uint8
    kv_q_key_slot       [L, Q, KVH, D]           uint8     slot of channel d in k_high, or 255
    kv_q_key_min_scale  [L, Q, KVH, D, 2]        float16
    kv_q_value_min_scale[L, Q, KVH, QP, 2]       float16

Bytes of a page per kv head: QP·D/4 (k_low) + QP·B/4 + D + 4·D (keys) and QP·D/4 + 4·QP (values); at
D = 128, QP = 128, f = 0.25: 2.53 bits per element over K and V, metadata included (`bits_per_element`).

Page size vs sink and window: the runtime's pages stay small (16 tokens: append, the block table and
the window move in steps of 16), and G = QP / 16 = 8 of them are quantised together into one 128-token
page, so the per-channel statistics cover Kitty's group while the sink (32 = 2 pages) and the window
(128 = 8 pages) are exact. A sequence holds at most sink + window + G + 1 pages of 16 in full precision
(19 pages, 304 tokens: a group waits until all its tokens are older than the window).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tensorpress.compiler.formats.kv_cache import CacheTensor
from tensorpress.compiler.formats.kv_page_quantised import NUM_QUANTISED_PAGES, PageQuantisedKVFormat
from tensorpress.errors import ConfigError

FP16_MAX = np.float32(65504.0)
PAGE_SIZE = 128
BOOST_FRACTIONS = (0.0, 0.125, 0.25)


def boosted_count(head_dim: int, boost_fraction: float) -> int:
    """B = f · D boosted key channels; refused unless a whole number and a multiple of 4 (packing)."""
    count = boost_fraction * head_dim
    if not 0 <= boost_fraction <= 1 or count != int(count) or int(count) % 4:
        raise ConfigError(
            f"int2-kitty boost fraction {boost_fraction} of head_dim {head_dim} must give a multiple of 4 "
            "channels (e.g. 0.125 or 0.25 of 128)."
        )
    return int(count)


def asymmetric_quantize(x: np.ndarray, levels: np.ndarray | int, axis: int):
    """Codes 0..levels of x along `axis` (float32 arithmetic, round half to even), and the fp16 min and
    scale of each group: min = fp16(min x), scale = fp16(max(0, max x - min) / levels) (kv_int4's rule).
    `levels` broadcasts against the groups (3 for 2 bits, 15 for 4)."""
    x = np.asarray(x, np.float32)
    low = np.clip(x.min(axis=axis), -FP16_MAX, FP16_MAX).astype(np.float16)
    low32 = low.astype(np.float32)
    levels32 = np.asarray(levels, np.float32)
    scale = np.minimum(np.maximum((x.max(axis=axis) - low32) / levels32, np.float32(0)), FP16_MAX).astype(np.float16)
    step = np.expand_dims(scale.astype(np.float32), axis)
    top = np.expand_dims(np.broadcast_to(levels32, scale.shape), axis)
    safe = np.where(step > 0, step, np.float32(1))
    codes = np.where(step > 0, np.clip(np.rint((x - np.expand_dims(low32, axis)) / safe), 0, top), 0)
    return codes.astype(np.uint8), low, scale


def pack_2bit(codes: np.ndarray) -> np.ndarray:
    """[..., N] values 0..3 -> [..., N/4] uint8, element 4j + i in bits 2i..2i+1 of byte j."""
    c = codes.astype(np.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // 4, 4)
    return c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)


def unpack_2bit(packed: np.ndarray) -> np.ndarray:
    """The inverse of `pack_2bit`."""
    parts = [(packed >> shift) & 3 for shift in (0, 2, 4, 6)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], 4 * packed.shape[-1])


@dataclass
class KittyPage:
    """The stored arrays of one page of one kv head (module docstring)."""

    k_low: np.ndarray  # [PS, D/4] uint8
    k_high: np.ndarray  # [PS, B/4] uint8
    k_index: np.ndarray  # [B] uint8, ascending
    k_min_scale: np.ndarray  # [D, 2] float16
    v_codes: np.ndarray  # [PS, D/4] uint8
    v_min_scale: np.ndarray  # [PS, 2] float16

    def nbytes(self) -> int:
        return sum(a.nbytes for a in vars(self).values())


def channel_strength(keys: np.ndarray) -> np.ndarray:
    """Σ_t |K[t, d]| of a key page [PS, D], summed in token order in float32 (the kernel's order)."""
    strength = np.zeros(keys.shape[1], np.float32)
    for row in np.abs(keys.astype(np.float32)):
        strength += row
    return strength


def boosted_channels(keys: np.ndarray, count: int) -> np.ndarray:
    """The `count` channels of a key page [PS, D] with the largest sum (so mean) of |K|, ascending
    (ties: lower index)."""
    order = np.argsort(-channel_strength(keys), kind="stable")
    return np.sort(order[:count]).astype(np.uint8)


def quantize_page(keys: np.ndarray, values: np.ndarray, boost_fraction: float = 0.25) -> KittyPage:
    """Quantise and pack one page: keys, values [PS, D] (any float dtype) -> KittyPage."""
    page_size, head_dim = keys.shape
    if head_dim % 4 or head_dim > 256:
        raise ConfigError(f"int2-kitty packs 4 channels a byte and indexes them in a byte: head_dim {head_dim}.")
    count = boosted_count(head_dim, boost_fraction)
    index = boosted_channels(keys, count)
    levels = np.full(head_dim, 3, np.float32)
    levels[index] = 15
    k_codes, k_min, k_scale = asymmetric_quantize(keys, levels, axis=0)  # per channel, over the page
    v_codes, v_min, v_scale = asymmetric_quantize(values, 3, axis=1)  # per token, over the channels
    return KittyPage(
        k_low=pack_2bit(k_codes & 3),
        k_high=pack_2bit(k_codes[:, index.astype(np.intp)] >> 2),
        k_index=index,
        k_min_scale=np.stack([k_min, k_scale], axis=-1),
        v_codes=pack_2bit(v_codes),
        v_min_scale=np.stack([v_min, v_scale], axis=-1),
    )


def key_codes(page: KittyPage) -> np.ndarray:
    """[PS, D] key codes: low | high << 2, high only on the boosted channels."""
    codes = unpack_2bit(page.k_low)
    codes[:, page.k_index.astype(np.intp)] |= unpack_2bit(page.k_high) << 2
    return codes


def dequantize_page(page: KittyPage, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """KittyPage -> (keys, values) [PS, D]: min + code · scale in float32 (code · scale is exact: fp16
    scale), rounded once to `dtype`."""
    k_min, k_scale = (page.k_min_scale[:, i].astype(np.float32) for i in (0, 1))
    k = key_codes(page).astype(np.float32) * k_scale + k_min
    v_codes = unpack_2bit(page.v_codes).astype(np.float32)
    v = v_codes * page.v_min_scale[:, 1:2].astype(np.float32) + page.v_min_scale[:, 0:1].astype(np.float32)
    return k.astype(dtype), v.astype(dtype)


def bits_per_element(head_dim: int, page_size: int = PAGE_SIZE, boost_fraction: float = 0.25) -> float:
    """Stored bits per K/V element of a full page in the cache, metadata (scales, slot map) included (sink
    and window excluded)."""
    count = boosted_count(head_dim, boost_fraction)
    key_bytes = page_size * head_dim // 4 + page_size * count // 4 + head_dim + 4 * head_dim  # slot map: D bytes
    value_bytes = page_size * head_dim // 4 + 4 * page_size
    return 8 * (key_bytes + value_bytes) / (2 * page_size * head_dim)


NOT_BOOSTED = 255  # the slot map's mark of a channel without high bits


def slot_map(index: np.ndarray, head_dim: int) -> np.ndarray:
    """[D] uint8: the high-plane slot of each boosted channel (its rank in `index`), 255 elsewhere."""
    slots = np.full(head_dim, NOT_BOOSTED, np.uint8)
    slots[index.astype(np.intp)] = np.arange(len(index), dtype=np.uint8)
    return slots


@dataclass(frozen=True)
class Int2KittyKVCache(PageQuantisedKVFormat):
    """int2-kitty pages (module docstring): boost_fraction f of the key channels at 4 bits, `sink` and
    `window` tokens full precision, quantised pages of `page_tokens` tokens."""

    boost_fraction: float = 0.25
    sink: int = 32
    window: int = 128
    page_tokens: int = PAGE_SIZE
    # CPU: q·k over 2-bit pages as int8 x code dot products (int8_query_keys); None: where they are faster
    int8_query: bool | None = None
    name: str = "int2-kitty"

    def __post_init__(self):
        if self.boost_fraction not in BOOST_FRACTIONS:
            raise ConfigError(
                f"int2-kitty boost_fraction must be one of {', '.join(map(str, BOOST_FRACTIONS))}, got "
                f"{self.boost_fraction}."
            )
        for field, value in (("sink", self.sink), ("window", self.window), ("page_tokens", self.page_tokens)):
            if not isinstance(value, int) or value < (1 if field == "page_tokens" else 0):
                raise ConfigError(f"int2-kitty {field} must be a whole number of tokens, got {value!r}.")

    def with_options(self, **options) -> Int2KittyKVCache:
        """This format with the KVCacheConfig's options (boost_fraction, sink, window, page_tokens) set."""
        given = {k: v for k, v in options.items() if v is not None}
        return Int2KittyKVCache(**{**vars(self), **given}) if given else self

    def boosted(self, head_dim: int) -> int:
        if head_dim % 4 or head_dim > 255:
            raise ConfigError(
                f"int2-kitty packs 4 channels a byte and indexes them in a byte: head_dim {head_dim} must be a "
                "multiple of 4 below 256; choose --kv-cache-dtype int4 for this model."
            )
        return boosted_count(head_dim, self.boost_fraction)

    def quantised_tensors(self, num_layers, kv_heads, head_dim, model_dtype) -> list[CacheTensor]:
        QP, D, B4 = self.page_tokens, head_dim, max(self.boosted(head_dim) // 4, 1)
        lq = (num_layers, NUM_QUANTISED_PAGES)
        return [
            CacheTensor("kv_q_codes", (*lq, 2, kv_heads, QP, D // 4), "uint8"),
            CacheTensor("kv_q_key_high", (*lq, kv_heads, QP, B4), "uint8"),
            CacheTensor("kv_q_key_slot", (*lq, kv_heads, D), "uint8"),
            CacheTensor("kv_q_key_min_scale", (*lq, kv_heads, D, 2), "float16"),
            CacheTensor("kv_q_value_min_scale", (*lq, kv_heads, QP, 2), "float16"),
        ]

    def quantised_code_bits(self) -> int:
        return 2

    def quantize_page(self, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, ...]:
        page = quantize_page(keys, values, self.boost_fraction)
        head_dim = keys.shape[1]
        high = page.k_high if page.k_high.shape[1] else np.zeros((len(keys), 1), np.uint8)
        slots = slot_map(page.k_index, head_dim)
        return np.stack([page.k_low, page.v_codes]), high, slots, page.k_min_scale, page.v_min_scale

    def dequantize_page(self, stored: Sequence[np.ndarray], model_dtype: str) -> tuple[np.ndarray, np.ndarray]:
        codes, high, slots, k_min_scale, v_min_scale = stored
        index = np.flatnonzero(slots != NOT_BOOSTED)
        index = index[np.argsort(slots[index])].astype(np.uint8)
        page = KittyPage(codes[0], high[:, : len(index) // 4], index, k_min_scale, codes[1], v_min_scale)
        return dequantize_page(page, model_dtype)

    def quantize_pages_func(self, kv_heads, head_dim, page_size, model_dtype):
        return _quantize_pages_func(
            kv_heads, head_dim, page_size, self.page_tokens, self.boosted(head_dim), model_dtype
        )

    def int8_query_keys(self, head_dim: int):
        """The key planes (low: codes[.., 0, ..], high: key_high, both as words), the slot map and the
        per-channel (scale, min) for the int8-query scores (`schedules/cpu/int8_query_scores.py`)."""
        from tensorpress.schedules.cpu.int8_query_scores import (
            Int8QueryKeys,
            key_codes_row,
            row_bytes,
            strided_load,
        )

        def high_row(quantised, layer, qpage, head, row, chunk, count=8):
            return row_bytes(quantised[1], [layer, qpage, head, row, chunk * 8], count)

        def slot(quantised, layer, qpage, head, d):
            return quantised[2][layer, qpage, head, d].astype("int32")

        def channel_vector(quantised, layer, qpage, head, channel, part):  # part 0: scale, 1: min
            scales = strided_load(quantised[3], [layer, qpage, head, channel, 1 - part], 3, lanes=4, step=4)
            return scales.astype("float32x4")

        def rows_to_prefetch(quantised, layer, qpage, head, row):  # 8 rows: codes, high bits, value scales
            codes, high, _, _, value_min_scale = quantised
            lines = [codes[layer, qpage, kv, head, row + 2 * i, 0] for kv in (0, 1) for i in range(4)]
            return [*lines, high[layer, qpage, head, row, 0], value_min_scale[layer, qpage, head, row, 0]]

        return Int8QueryKeys(
            "channel", key_codes_row, channel_vector=channel_vector, high_row=high_row,
            rows_to_prefetch=rows_to_prefetch,
            high_count=self.boosted(head_dim), slot=slot,
        )  # fmt: skip

    def read_quantised(self, quantised, layer, page, kv, head, row, d, dtype):
        from tvm import tirx

        codes, high, slots, key_min_scale, value_min_scale = quantised
        two_bits = lambda byte, i: (byte.astype("int32") >> ((i % 4) * 2).astype("int32")) & 3  # noqa: E731
        low = two_bits(codes[layer, page, kv, head, row, d // 4], d)
        if kv == 0:  # per channel; a boosted channel's high bits from its slot
            slot = slots[layer, page, head, d].astype("int32")
            last = int(high.shape[4]) * 4 - 1
            clamped = tirx.min(slot, last)
            high_bits = two_bits(high[layer, page, head, row, clamped // 4], clamped)
            # a branch, not a select: the high plane is read for the boosted channels only (the slot
            # is the same for every row of a vector, so a vectorised gather skips 1 - f of its loads)
            code = low | tirx.if_then_else(slot != NOT_BOOSTED, high_bits, 0) << 2
            minimum, step = key_min_scale[layer, page, head, d, 0], key_min_scale[layer, page, head, d, 1]
        else:  # per token
            code = low
            minimum, step = value_min_scale[layer, page, head, row, 0], value_min_scale[layer, page, head, row, 1]
        return (code.astype("float32") * step.astype("float32") + minimum.astype("float32")).astype(dtype)


def _quantize_pages_func(kv_heads: int, head_dim: int, page_size: int, page_tokens: int, boosted: int, dtype: str):
    """kv_quantize_pages(pages, *quantised, src[K, G], dst[K]): for every layer and kv head, the QP tokens
    of fp pages src[k, :] quantised into page dst[k] exactly as `quantize_page` does. Blocks, each over
    (k, layer, kv head, ...): strength, rank, slot (the boosted channels and their slots), key_min /
    key_max / key_min_scale (per channel), value_min / value_max / value_min_scale (per token),
    boosted_index (slot -> channel), codes, key_high."""
    from tvm import tirx
    from tvm.script import tirx as T

    KVH, D, PS, QP, B = kv_heads, head_dim, page_size, page_tokens, boosted
    G, DB, BB = QP // PS, D // 4, max(B // 4, 1)
    f16_max = float(FP16_MAX)

    def code(x, low, step, levels):
        level = tirx.nearbyint((x.astype("float32") - low.astype("float32")) / step.astype("float32"))
        clipped = T.max(T.min(level, levels), T.float32(0))
        return T.if_then_else(step.astype("float32") > T.float32(0), clipped, T.float32(0)).astype("uint8")

    def fp16_min(lo):
        """The stored min: fp16(min), clipped to fp16's range."""
        return T.max(T.min(lo, T.float32(f16_max)), T.float32(-f16_max)).astype("float16")

    def pack4(parts):
        """Four 2-bit codes (uint8) into one byte, part i in bits 2i..2i+1."""
        byte = parts[0] & T.uint8(3)
        for i in range(1, 4):
            byte = byte | ((parts[i] & T.uint8(3)) << T.uint8(2 * i))
        return byte

    def codes_byte(pages, key_ms, slots, value_ms, layer, fp, q, kv, g, t, j):
        """Byte j of row t: the low bits of the keys' codes (kv = 0, on each channel's grid: 16 levels if
        boosted) or the values' codes (kv = 1)."""
        parts = []
        for i in range(4):
            x = pages[layer, fp, kv, g, t % PS, j * 4 + i]
            levels = T.if_then_else(slots[layer, q, g, j * 4 + i] != T.uint8(NOT_BOOSTED), T.float32(15), T.float32(3))
            key = code(x, key_ms[layer, q, g, j * 4 + i, 0], key_ms[layer, q, g, j * 4 + i, 1], levels)
            value = code(x, value_ms[layer, q, g, t, 0], value_ms[layer, q, g, t, 1], T.float32(3))
            parts.append(T.if_then_else(kv == 0, key, value))
        return pack4(parts)

    def high_byte(pages, key_ms, index, k, layer, fp, q, g, t, j):
        """Byte j of row t of the high plane: the top 2 bits of the 4-bit codes of slots 4j..4j+3."""
        parts = []
        for i in range(4):
            ch = index[k, layer, g, j * 4 + i]
            full = code(pages[layer, fp, 0, g, t % PS, ch], key_ms[layer, q, g, ch, 0], key_ms[layer, q, g, ch, 1],
                        T.float32(15))  # fmt: skip
            parts.append(T.if_then_else(j * 4 + i < B, full >> T.uint8(2), T.uint8(0)))
        return pack4(parts)

    @T.prim_func(private=True, s_tir=True)
    def kv_quantize_pages(
        var_pages: T.handle,
        var_codes: T.handle,
        var_high: T.handle,
        var_slots: T.handle,
        var_key_ms: T.handle,
        var_value_ms: T.handle,
        var_src: T.handle,
        var_dst: T.handle,
    ):
        T.func_attr({"tirx.noalias": True})
        L, P, Q, K = T.int64(), T.int64(), T.int64(), T.int64()
        pages = T.match_buffer(var_pages, (L, P, 2, KVH, PS, D), dtype)
        codes = T.match_buffer(var_codes, (L, Q, 2, KVH, QP, DB), "uint8")
        high = T.match_buffer(var_high, (L, Q, KVH, QP, BB), "uint8")
        slots = T.match_buffer(var_slots, (L, Q, KVH, D), "uint8")
        key_ms = T.match_buffer(var_key_ms, (L, Q, KVH, D, 2), "float16")
        value_ms = T.match_buffer(var_value_ms, (L, Q, KVH, QP, 2), "float16")
        src = T.match_buffer(var_src, (K, G), "int32")
        dst = T.match_buffer(var_dst, (K,), "int32")
        with T.sblock("root"):
            strength = T.sblock_alloc_buffer((K, L, KVH, D), "float32")
            rank = T.sblock_alloc_buffer((K, L, KVH, D), "int32")
            slot = T.sblock_alloc_buffer((K, L, KVH, D), "int32")
            key_min = T.sblock_alloc_buffer((K, L, KVH, D), "float32")
            key_max = T.sblock_alloc_buffer((K, L, KVH, D), "float32")
            value_min = T.sblock_alloc_buffer((K, L, KVH, QP), "float32")
            value_max = T.sblock_alloc_buffer((K, L, KVH, QP), "float32")
            index = T.sblock_alloc_buffer((K, L, KVH, BB * 4), "int32")
            for k, ly, g, d, t in T.grid(K, L, KVH, D, QP):
                with T.sblock("strength"):
                    vk, vl, vg, vd, vt = T.axis.remap("SSSSR", [k, ly, g, d, t])
                    with T.init():
                        strength[vk, vl, vg, vd] = T.float32(0)
                    strength[vk, vl, vg, vd] = strength[vk, vl, vg, vd] + T.abs(
                        pages[vl, src[vk, vt // PS], 0, vg, vt % PS, vd].astype("float32")
                    )
            for k, ly, g, d, e in T.grid(K, L, KVH, D, D):
                with T.sblock("rank"):  # channels stronger than d (ties: lower index first)
                    vk, vl, vg, vd, ve = T.axis.remap("SSSSR", [k, ly, g, d, e])
                    with T.init():
                        rank[vk, vl, vg, vd] = 0
                    rank[vk, vl, vg, vd] = rank[vk, vl, vg, vd] + T.Cast(
                        "int32",
                        (strength[vk, vl, vg, ve] > strength[vk, vl, vg, vd])
                        or (strength[vk, vl, vg, ve] == strength[vk, vl, vg, vd] and ve < vd),
                    )
            for k, ly, g, d, e in T.grid(K, L, KVH, D, D):
                with T.sblock("slot"):  # boosted channels below d
                    vk, vl, vg, vd, ve = T.axis.remap("SSSSR", [k, ly, g, d, e])
                    with T.init():
                        slot[vk, vl, vg, vd] = 0
                    slot[vk, vl, vg, vd] = slot[vk, vl, vg, vd] + T.Cast("int32", ve < vd and rank[vk, vl, vg, ve] < B)
            for k, ly, g, d, t in T.grid(K, L, KVH, D, QP):
                with T.sblock("key_min"):
                    vk, vl, vg, vd, vt = T.axis.remap("SSSSR", [k, ly, g, d, t])
                    with T.init():
                        key_min[vk, vl, vg, vd] = T.max_value("float32")
                    key_min[vk, vl, vg, vd] = T.min(
                        key_min[vk, vl, vg, vd], pages[vl, src[vk, vt // PS], 0, vg, vt % PS, vd].astype("float32")
                    )
            for k, ly, g, d, t in T.grid(K, L, KVH, D, QP):
                with T.sblock("key_max"):
                    vk, vl, vg, vd, vt = T.axis.remap("SSSSR", [k, ly, g, d, t])
                    with T.init():
                        key_max[vk, vl, vg, vd] = T.min_value("float32")
                    key_max[vk, vl, vg, vd] = T.max(
                        key_max[vk, vl, vg, vd], pages[vl, src[vk, vt // PS], 0, vg, vt % PS, vd].astype("float32")
                    )
            for k, ly, g, d in T.grid(K, L, KVH, D):
                with T.sblock("key_min_scale"):
                    vk, vl, vg, vd = T.axis.remap("SSSS", [k, ly, g, d])
                    T.reads(dst[vk], rank[vk, vl, vg, vd], slot[vk, vl, vg, vd], key_min[vk, vl, vg, vd],
                            key_max[vk, vl, vg, vd])  # fmt: skip
                    T.writes(key_ms[vl, 0:Q, vg, vd, 0:2], slots[vl, 0:Q, vg, vd])
                    levels: T.let[T.float32] = T.if_then_else(rank[vk, vl, vg, vd] < B, T.float32(15), T.float32(3))
                    low: T.let[T.float16] = fp16_min(key_min[vk, vl, vg, vd])
                    key_ms[vl, dst[vk], vg, vd, 0] = low
                    key_ms[vl, dst[vk], vg, vd, 1] = T.min(
                        T.max((key_max[vk, vl, vg, vd] - low.astype("float32")) / levels, T.float32(0)),
                        T.float32(f16_max),
                    ).astype("float16")
                    slots[vl, dst[vk], vg, vd] = T.if_then_else(
                        rank[vk, vl, vg, vd] < B, T.Cast("uint8", slot[vk, vl, vg, vd]), T.uint8(NOT_BOOSTED)
                    )
            for k, ly, g, t, d in T.grid(K, L, KVH, QP, D):
                with T.sblock("value_min"):
                    vk, vl, vg, vt, vd = T.axis.remap("SSSSR", [k, ly, g, t, d])
                    with T.init():
                        value_min[vk, vl, vg, vt] = T.max_value("float32")
                    value_min[vk, vl, vg, vt] = T.min(
                        value_min[vk, vl, vg, vt], pages[vl, src[vk, vt // PS], 1, vg, vt % PS, vd].astype("float32")
                    )
            for k, ly, g, t, d in T.grid(K, L, KVH, QP, D):
                with T.sblock("value_max"):
                    vk, vl, vg, vt, vd = T.axis.remap("SSSSR", [k, ly, g, t, d])
                    with T.init():
                        value_max[vk, vl, vg, vt] = T.min_value("float32")
                    value_max[vk, vl, vg, vt] = T.max(
                        value_max[vk, vl, vg, vt], pages[vl, src[vk, vt // PS], 1, vg, vt % PS, vd].astype("float32")
                    )
            for k, ly, g, t in T.grid(K, L, KVH, QP):
                with T.sblock("value_min_scale"):
                    vk, vl, vg, vt = T.axis.remap("SSSS", [k, ly, g, t])
                    T.reads(dst[vk], value_min[vk, vl, vg, vt], value_max[vk, vl, vg, vt])
                    T.writes(value_ms[vl, 0:Q, vg, vt, 0:2])
                    v_low: T.let[T.float16] = fp16_min(value_min[vk, vl, vg, vt])
                    value_ms[vl, dst[vk], vg, vt, 0] = v_low
                    value_ms[vl, dst[vk], vg, vt, 1] = T.min(
                        T.max((value_max[vk, vl, vg, vt] - v_low.astype("float32")) / T.float32(3), T.float32(0)),
                        T.float32(f16_max),
                    ).astype("float16")
            for k, ly, g, s, d in T.grid(K, L, KVH, BB * 4, D):
                with T.sblock("boosted_index"):  # slot s -> its channel (0 for unused slots)
                    vk, vl, vg, vs, vd = T.axis.remap("SSSSR", [k, ly, g, s, d])
                    with T.init():
                        index[vk, vl, vg, vs] = 0
                    index[vk, vl, vg, vs] = index[vk, vl, vg, vs] + T.if_then_else(
                        rank[vk, vl, vg, vd] < B and slot[vk, vl, vg, vd] == T.Cast("int32", vs), T.Cast("int32", vd), 0
                    )
            for k, ly, g, kv, t, j in T.grid(K, L, KVH, 2, QP, DB):
                with T.sblock("codes"):
                    vk, vl, vg, vkv, vt, vj = T.axis.remap("SSSSSS", [k, ly, g, kv, t, j])
                    T.reads(dst[vk], src[vk, vt // PS], pages[vl, 0:P, vkv, vg, vt % PS, vj * 4 : vj * 4 + 4],
                            key_ms[vl, 0:Q, vg, vj * 4 : vj * 4 + 4, 0:2], slots[vl, 0:Q, vg, vj * 4 : vj * 4 + 4],
                            value_ms[vl, 0:Q, vg, vt, 0:2])  # fmt: skip
                    T.writes(codes[vl, 0:Q, vkv, vg, vt, vj])
                    q: T.let[T.int32] = dst[vk]
                    fp: T.let[T.int32] = src[vk, vt // PS]
                    codes[vl, q, vkv, vg, vt, vj] = codes_byte(
                        pages, key_ms, slots, value_ms, vl, fp, q, vkv, vg, vt, vj
                    )
            for k, ly, g, t, j in T.grid(K, L, KVH, QP, BB):
                with T.sblock("key_high"):
                    vk, vl, vg, vt, vj = T.axis.remap("SSSSS", [k, ly, g, t, j])
                    T.reads(dst[vk], src[vk, vt // PS], index[vk, vl, vg, vj * 4 : vj * 4 + 4],
                            pages[vl, 0:P, 0, vg, vt % PS, 0:D], key_ms[vl, 0:Q, vg, 0:D, 0:2])  # fmt: skip
                    T.writes(high[vl, 0:Q, vg, vt, vj])
                    hq: T.let[T.int32] = dst[vk]
                    hfp: T.let[T.int32] = src[vk, vt // PS]
                    high[vl, hq, vg, vt, vj] = high_byte(pages, key_ms, index, vk, vl, hfp, hq, vg, vt, vj)

    return kv_quantize_pages
