"""The code stream of a sparse x FPx weight: its nonzero b-bit eXmY codes back to back in one bit string.

Code i is bits i·b .. i·b + b - 1 of the stream, the stream's bit n being bit n % 32 of word n // 32 of
the stored "codes" (uint32 [1, L·b/32] for L codes, L a multiple of 32: whole words for any b). A code
may straddle two words (b = 6: code 5 is bits 30..35):

    word 0: │ c5 (low 2 bits) c4 c3 c2 c1 c0 │ word 1: │ c10 (low 4) c9 c8 c7 c6 c5 (high 4) │ ...
            bit 31 ..........................  0

A run of codes from any index i is then one funnel shift away: the 64 bits of words i·b // 32 and the
next, shifted right by (i·b) % 32, hold codes i, i + 1, ... in their low 32 bits, b bits each, 32 // b
of them whole (`window`). The integer arithmetic works on numpy arrays and TVM PrimExprs alike.
"""

from __future__ import annotations

import numpy as np

WORD_BITS = 32
NAME = "codes"  # the stored array


def stream_shape(length: int, bits: int) -> tuple[int, int]:
    """Shape [1, length·bits/32] of the "codes" array of a stream of `length` codes (a multiple of 32)."""
    return 1, length * bits // WORD_BITS


def pack_stream(stream: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [L] (L a multiple of 32) -> the "codes" array uint32 [1, L·bits/32]."""
    fields = (stream.astype(np.uint8)[:, None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)  # [L, bits]
    string = fields.reshape(-1, WORD_BITS).astype(np.uint64)  # the bit string, 32 bits a word, low first
    words = string @ (np.uint64(1) << np.arange(WORD_BITS, dtype=np.uint64))
    return words.astype(np.uint32)[None, :]


def unpack_stream(codes: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `pack_stream`: the uint8 codes of the whole stream."""
    string = (codes[0][:, None] >> np.arange(WORD_BITS, dtype=np.uint32)) & np.uint32(1)  # [words, 32]
    fields = string.reshape(-1, bits).astype(np.uint32)  # [L, bits]
    return (fields << np.arange(bits, dtype=np.uint32)).sum(axis=1).astype(np.uint8)


def window(codes, bits: int, index):
    """uint32 TIR: codes index, index + 1, ... (32 // bits of them whole), lowest first. Reads the word
    after index's first bit's: the stream keeps a spare word (`bitmap_fpx.stream_length`)."""
    from tvm import tirx

    first = index * bits
    low, high = (codes[0, first // WORD_BITS + i].astype("uint64") for i in range(2))
    pair = (high << tirx.const(WORD_BITS, "uint64")) | low
    return (pair >> (first % WORD_BITS).astype("uint64")).astype("uint32")
