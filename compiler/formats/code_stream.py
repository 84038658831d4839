"""The code stream of a sparse x FPx weight: its nonzero eXmY codes in order, as sequential bit planes.

The codes are split in the power-of-two planes of `fpx_layout` (6 = 4 + 2, widest plane = lowest code
bits), but a plane here is plain: code i's p-bit field is bits (i·p) % 32 .. + p - 1 of word i·p // 32,
so consecutive codes are consecutive fields (no lane interleave) and a field never straddles a word:

    plane4  word 0: │ c7 c6 c5 c4 c3 c2 c1 c0 │ word 1: │ c15 ... c8 │ ...     8 codes a word
    plane2  word 0: │ c15 c14 ... c1 c0 │ word 1: │ c31 ... c16 │ ...         16 codes a word

A run of codes that starts at any index i is then one funnel shift away: the 64 bits of words
i·p // 32 and the next, shifted right by (i·p) % 32, hold codes i, i + 1, ... in their low bits, p bits
each, 32 / p of them (`window`). Planes are uint32 [1, L·p/32] for a stream of L codes, L a multiple of
32 (whole words in every plane); the integer arithmetic works on numpy arrays and TVM PrimExprs alike.
"""

from __future__ import annotations

import numpy as np

from tensorpress.compiler.formats.fpx_layout import WORD_BITS, plane_name, plane_shifts, plane_widths


def field_word(index, width: int):
    """The word of a `width`-bit plane holding code `index`'s field (int, numpy array or PrimExpr)."""
    return index * width // WORD_BITS


def field_bit(index, width: int):
    """The lowest bit of code `index`'s field in that word."""
    return index * width % WORD_BITS


def plane_shape(length: int, width: int) -> tuple[int, int]:
    """Shape [1, length·width/32] of the `width`-bit plane of a stream of `length` codes (a multiple of 32)."""
    return 1, length * width // WORD_BITS


def pack_planes(stream: np.ndarray, bits: int) -> dict[str, np.ndarray]:
    """uint8 codes [L] (L a multiple of 32) -> {"plane4": uint32 [1, L·4/32], ...}, widest first."""
    planes = {}
    for width, shift in zip(plane_widths(bits), plane_shifts(bits)):
        fields = (stream.astype(np.uint32) >> np.uint32(shift)) & np.uint32((1 << width) - 1)
        fields = fields.reshape(-1, WORD_BITS // width)  # the fields of one word, lowest first
        places = np.arange(WORD_BITS // width, dtype=np.uint32) * np.uint32(width)
        planes[plane_name(width)] = np.bitwise_or.reduce(fields << places, axis=1).astype(np.uint32)[None, :]
    return planes


def unpack_planes(planes: dict[str, np.ndarray], bits: int) -> np.ndarray:
    """Inverse of `pack_planes`: the uint8 codes of the whole stream, read field by field."""
    widths = plane_widths(bits)
    length = planes[plane_name(widths[0])].shape[1] * WORD_BITS // widths[0]
    index = np.arange(length, dtype=np.int64)
    codes = np.zeros(length, np.uint32)
    for width, shift in zip(widths, plane_shifts(bits)):
        words = planes[plane_name(width)][0, field_word(index, width)]
        codes |= ((words >> field_bit(index, width).astype(np.uint32)) & np.uint32((1 << width) - 1)) << shift
    return codes.astype(np.uint8)


def window(plane, width: int, index):
    """uint32 TIR: plane's fields of codes index, index + 1, ... (32 / width of them), lowest first.
    Reads the word after index's: the stream keeps a spare word (`bitmap_fpx.stream_length`)."""
    from tvm import tirx

    word = field_word(index, width)
    low, high = (plane[0, word + i].astype("uint64") for i in range(2))
    pair = (high << tirx.const(WORD_BITS, "uint64")) | low
    return (pair >> field_bit(index, width).astype("uint64")).astype("uint32")
