"""int2-kitty KV pages (Kitty, 2025): the numpy reference of one page — quantise, pack, dequantise.

NOT REGISTERED: the runtime path (page-granular quantisation when a page leaves the recent window, a
full-precision sink and window, an attention that reads both) is not built yet, so `--kv-cache-dtype`
does not offer it. This file is the page format and its reference, which that path will pack with and
test against.

One page holds PS consecutive tokens (PS = 128: the per-channel metadata of a page is then 0.27 bits per
element) of one kv head, D channels. Keys are quantised per channel over the page's tokens, values per
token over the channels; both asymmetric 2-bit (x̂ = min + code · scale, min and scale fp16, rounded as
in `kv_int4.py`). In each key page the B = f · D channels with the largest mean |K| over the page get 4
bits instead: their codes are split into the 2-bit low plane that every channel has and a 2-bit high
plane of the boosted channels only, so dequantisation is one uniform rule, code = low | high << 2 (high
= 0 for the others), and the channel's scale says which grid it is on (range / 15 or range / 3).

One page of one kv head (D = 8, PS = 4, f = 0.25: B = 2 boosted channels, here 1 and 6):

    k_low   [PS, D/4]  uint8     channel:   3  2  1  0     7  6  5  4      (2 bits each, channel 4j in
                                 token 0  [ l  l  l  l ] [ l  l  l  l ]      the low bits of byte j)
                                 token 1  [ ...         ] [ ...       ]
    k_high  [PS, B/4]  uint8     token t  [ -  -  h6 h1 ]                   (boosted channels in index
    k_index [B]        uint8     [1, 6]                                      order; B a multiple of 4)
    k_min_scale [D, 2] float16   per channel: (min over the page, scale)    scale = range/15 if boosted
                                                                             else range/3
    v_codes [PS, D/4]  uint8     token t  [ c3 c2 c1 c0 ] [ c7 c6 c5 c4 ]   per token, 2 bits
    v_min_scale [PS, 2] float16  per token: (min over D, range / 3)

Bytes of a page per kv head: PS·D/4 (k_low) + PS·B/4 + B + 4·D (keys) and PS·D/4 + 4·PS (values); at
D = 128, PS = 128, f = 0.25: 2.51 bits per element over K and V, metadata included (`bits_per_element`).

The runtime path this format waits for (planned):
- Two pools of pages of PS tokens: a full-precision one (`kv_pages`, the model dtype) for each sequence's
  first page (the sink) and its last pages (the recent window and the page being filled), and a
  quantised one holding the arrays above per (layer, page, kv head), plus a per-page channel -> high-plane
  slot map (D bytes, 255 = not boosted) so that a read finds a channel's high bits without a search.
  A block-table entry tags which pool its page id is in (quantised pages as -1 - id).
- `kv_quantize_pages(*cache, src[K], dst[K])`: one compiled kernel (a third function beside prefill and
  decode) that quantises K full-precision pages into K quantised ones for all layers and kv heads: the
  per-channel min / max / mean |K| reductions over the page, the top-B channels (fixed tie-break: lower
  index), the codes, the packing. The runtime calls it after a step for the pages that left the window
  (after a prefill: all the prompt's pages between the sink and the window; prefill itself attends in
  full precision), then frees the full-precision pages and rewrites the table entries. Both pools are
  reserved all-or-nothing when a sequence is admitted, so out-of-pages stays one error touching no other
  sequence.
- The attention keeps its one page read, branching on the entry's tag: chunks are page-aligned, so the
  branch is uniform per chunk (per CPU task and per CUDA CTA).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


def boosted_channels(keys: np.ndarray, count: int) -> np.ndarray:
    """The `count` channels of a key page [PS, D] with the largest mean |K|, ascending (ties: lower index)."""
    strength = np.abs(keys.astype(np.float32)).mean(axis=0)
    order = np.argsort(-strength, kind="stable")
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
    """Stored bits per K/V element of a full page, metadata included (sink and window excluded)."""
    count = boosted_count(head_dim, boost_fraction)
    key_bytes = page_size * head_dim // 4 + page_size * count // 4 + count + 4 * head_dim
    value_bytes = page_size * head_dim // 4 + 4 * page_size
    return 8 * (key_bytes + value_bytes) / (2 * page_size * head_dim)
