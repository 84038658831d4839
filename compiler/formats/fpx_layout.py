"""The bit-plane layout in which FPx codes travel to the GPU (pure numpy and integer arithmetic).

A b-bit code (b = 1 + X + Y) is split into power-of-two bit planes, widest first, the widest plane
holding the code's lowest bits (6 = 4 + 2, 5 = 4 + 1, 4 = 4, 7 = 4 + 2 + 1, 8 = 8):

    e3m2 code   s e e e m m          e2m2 code   s e e m m
    plane2      s e                  plane1      s
    plane4          e e m m          plane4        e e m m

Each plane is a 2-D uint32 array [M, Kp * p / 32] indexed by (row, word along K), p the plane's
width, Kp = K rounded up to K_ALIGN (128) with zero codes. Every code of a plane has the same width,
so a field never straddles a word, and 32 consecutive codes of a row (a "group") fill exactly p words.

What a CTA tile reads. A tile of block_m rows × block_k codes (block_k a multiple of 32) is, in
every plane, the rectangle rows × [k0·p/32, (k0 + block_k)·p/32): each row's part is contiguous
(block_k·p/8 bytes: 32 B of plane4 and 16 B of plane2 for block_k = 64), 16-byte aligned in global
memory (the row pitch Kp·p/8 is a multiple of 16 B), so cp.async copies it in whole 16-byte (or, for
a narrow plane1 tile, 8- or 4-byte) chunks that never straddle two K tiles:

                 K tile 0 (k0 = 0)        K tile 1 (k0 = 64)
    plane4 row r │ w0 w1 w2 w3 w4 w5 w6 w7 │ w8 ... w15 │ ...     8 words = 2 groups of 32 codes
    plane2 row r │ w0 w1 w2 w3             │ w4 ... w7  │ ...     4 words = 2 groups
    plane4 row r+1 │ ...                                          (next row: Kp·p/32 words further)

What a warp lane reads (for an mma.m16n8k16 B fragment). Lane 4g + t holds, for weight row g (and
g + 8), the K offsets 2t, 2t+1, 2t+8, 2t+9 of each 16-wide k step: over a group of 32 codes, the 8
codes k = 2t + 8j + h (j = 0..3, h = 0..1). Those 8 codes are one contiguous run of 4p bits per h,
and the two codes of a pair (2t + 8j, 2t + 8j + 1) -- the two halves of one half2 B register -- lie
exactly 16 bits apart. In a group, code k (t = (k%8)//2, j = k//8, h = k%2) sits at

    offset = t·4p + j·p          (position among the 16 codes of its half, times p)
    word   = offset // 16        bit = 16·h + offset % 16

    plane4, word t of a group (lane t's 8 codes; k relative to the group start):
      bit  31..28 27..24 23..20 19..16 │ 15..12 11..8  7..4   3..0
      k    2t+25  2t+17  2t+9   2t+1   │ 2t+24  2t+16  2t+8   2t          h = 1 │ h = 0
    plane2, word u of a group (lanes t = 2u and 2u + 1):
      bit  31..30 ..  25..24 │ 23..22 .. 17..16 │ 15..14 .. 9..8 │ 7..6 .. 1..0
      k    2t'+25 ..  2t'+1  │ 2t+25  ..  2t+1  │ 2t'+24 .. 2t'  │ 2t+24 .. 2t       (t' = t + 1)
    plane1: one word per group, lane t's codes in bits 4t..4t+3 (h = 0) and 16+4t..16+4t+3 (h = 1)
    plane8: two words per lane (2t: j = 0, 1; 2t+1: j = 2, 3), a code per byte, pairs 16 bits apart

So a lane's decode input is one 32-bit word of plane4 (8 codes), half a word of plane2, a quarter
word of plane1, and `(w >> 4j) & 0x000F000F` puts the pair j of plane4 into the two halves of a half2
(one shift and one mask per two weights). A warp that decodes 32 consecutive codes of one row (the
template's cooperative decode) reads p distinct words of a plane: broadcasts, free of bank conflicts.

Reading a row word by word (the CPU's order). Lane t's plane4 word holds the 8 codes k = 2t + 8j + h
of a group; `decode_position` numbers the codes of a group so that those 8 are consecutive, at
8t + 2j + h (j, h in order), which swaps the digits t and j of k = 2t + 8j + h (its own inverse):

    position in the group   0  1  2  3  4  5  6  7 │ 8  9 10 11 12 13 14 15 │ ... │ 24 ... 31
    column k of the group   0  1  8  9 16 17 24 25 │ 2  3 10 11 18 19 26 27 │ ... │  6 ...  31
                            └── plane4 word t = 0 ─┘ └── plane4 word t = 1 ─┘      └ word 3 ┘

A run of 8 positions reads one word of each plane (plane4 word t, plane2 word t // 2, plane1 word 0)
at bit offsets that depend on the position in the run only (and, for plane2 and plane1, on t's
parity): a CPU decodes it with one broadcast load and one per-lane shift per plane (AVX2 vpsrlvd).

The layout is written once, as integer arithmetic on (row, col) that works on numpy arrays and on
TVM PrimExprs alike (`word_in_row`, `bit_offset`, `decode_position`); the TIR decode stage and `unpack_fpx_planes` both
use it, and `pack_fpx_planes` builds the same layout independently by reshapes, so tests cross-check
the two. Change the layout here only.
"""

from __future__ import annotations

import numpy as np

from tensorpress.compiler.formats.fpx_codes import check_format, code_bits
from tensorpress.errors import TensorpressError

WORD_BITS = 32
HALF_BITS = 16  # a word holds the even-k codes of its lanes in bits 0..15, the odd-k codes in 16..31
GROUP_K = 32  # codes along K whose p-bit fields fill exactly p words
K_ALIGN = 128  # K is padded to this: rows of every plane are 16-byte multiples, tiles never straddle
LANES = 4  # lanes t = 0..3 of a fragment row share a group: lane t holds k = 2t + 8j + h


def plane_widths(bits: int) -> tuple[int, ...]:
    """Power-of-two plane widths of a `bits`-bit code, widest first (6 -> (4, 2), 7 -> (4, 2, 1))."""
    return tuple(p for p in (8, 4, 2, 1) if bits & p)


def plane_shifts(bits: int) -> tuple[int, ...]:
    """The code bit where each plane's field starts (widest plane holds the lowest bits)."""
    widths = plane_widths(bits)
    return tuple(sum(widths[:i]) for i in range(len(widths)))


def plane_name(width: int) -> str:
    """Name of the stored array of the `width`-bit plane ("plane4", "plane2", ...)."""
    return f"plane{width}"


def padded_k(k: int) -> int:
    """Kp: K rounded up to a multiple of K_ALIGN (the padding holds zero codes)."""
    return -(-k // K_ALIGN) * K_ALIGN


def row_words(k: int, width: int) -> int:
    """uint32 words per row of the `width`-bit plane for K codes per row (padding included)."""
    return padded_k(k) * width // WORD_BITS


def plane_shape(m: int, k: int, width: int) -> tuple[int, int]:
    """Shape [M, Kp * width / 32] of the `width`-bit plane of an [m, k] weight."""
    return m, row_words(k, width)


def plane_words(m: int, k: int, width: int) -> int:
    """Number of uint32 words of the `width`-bit plane for an [m, k] weight (padding included)."""
    return m * row_words(k, width)


def _offset_in_half(col, width: int):
    """t·4p + j·p: the first bit of column `col`'s field counted along its half-words (see picture)."""
    lane = col % 8 // 2
    step = col % GROUP_K // 8
    return lane * (LANES * width) + step * width


def word_in_row(col, width: int):
    """Word, within its row of the `width`-bit plane, holding the code of column `col`.

    col: an int, a numpy integer array or a TVM integer PrimExpr (the same arithmetic for all).
    """
    return col // GROUP_K * width + _offset_in_half(col, width) // HALF_BITS


def bit_offset(col, width: int):
    """Lowest bit, inside its word, of the `width`-bit field of column `col` (same types as above)."""
    return col % 2 * HALF_BITS + _offset_in_half(col, width) % HALF_BITS


DECODE_RUN = 8  # codes of one plane4 word: consecutive in `decode_position` order


def decode_position(col):
    """Position of column `col` when a row is read word by word (see the module docstring): within
    its group of 32, lane t's 8 codes become the run 8t..8t+7. A permutation of each group and its own
    inverse. col: an int, a numpy integer array or a TVM integer PrimExpr."""
    return col // GROUP_K * GROUP_K + col % 8 // 2 * DECODE_RUN + col % GROUP_K // 8 * 2 + col % 2


def pack_fpx_planes(codes: np.ndarray, ebits: int, mbits: int) -> dict[str, np.ndarray]:
    """Split eXmY codes uint8 [M, K] into bit planes in the kernel's layout (see the module docstring).

    Returns {"plane8"/"plane4"/"plane2"/"plane1": uint32 [M, Kp * p / 32]}, widest plane first.
    """
    check_format(ebits, mbits)
    bits = code_bits(ebits, mbits)
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype != np.uint8:
        raise TensorpressError(f"FPx codes must be a 2-D uint8 array, got {codes.dtype} {codes.shape}.")
    if codes.size and int(codes.max()) >> bits:
        raise TensorpressError(f"FPx codes hold values above the {bits} bits of e{ebits}m{mbits}.")
    m, k = codes.shape
    kp = padded_k(k)
    padded = np.zeros((m, kp), dtype=np.uint32)
    padded[:, :k] = codes
    # k in a group = 8j + 2t + h  ->  [row, group, j, t, h] -> [row, group, h, t, j]: per half h, the
    # 16 codes in the order of their offset t·4p + j·p.
    halves = padded.reshape(m, kp // GROUP_K, 4, LANES, 2).transpose(0, 1, 4, 3, 2)
    planes = {}
    for width, shift in zip(plane_widths(bits), plane_shifts(bits)):
        fields = (halves >> np.uint32(shift)) & np.uint32((1 << width) - 1)
        per_half_word = HALF_BITS // width
        fields = fields.reshape(m, kp // GROUP_K, 2, width, per_half_word)  # [.., h, half-word, field]
        positions = np.arange(per_half_word, dtype=np.uint32) * np.uint32(width)
        half_words = np.bitwise_or.reduce(fields << positions, axis=-1)  # [row, group, h, word]
        words = half_words[:, :, 0, :] | (half_words[:, :, 1, :] << np.uint32(HALF_BITS))
        planes[plane_name(width)] = np.ascontiguousarray(words.reshape(m, row_words(k, width)), dtype=np.uint32)
    return planes


def unpack_fpx_planes(planes: dict[str, np.ndarray], m: int, k: int, ebits: int, mbits: int) -> np.ndarray:
    """Inverse of `pack_fpx_planes`: uint8 codes [m, k], gathered through `word_in_row`/`bit_offset`."""
    check_format(ebits, mbits)
    bits = code_bits(ebits, mbits)
    rows = np.arange(m, dtype=np.int64)[:, None]
    cols = np.arange(k, dtype=np.int64)[None, :]
    codes = np.zeros((m, k), dtype=np.uint32)
    for width, shift in zip(plane_widths(bits), plane_shifts(bits)):
        words = np.asarray(planes[plane_name(width)])
        if words.dtype != np.uint32 or words.shape != plane_shape(m, k, width):
            raise TensorpressError(
                f"FPx {plane_name(width)} must be uint32 {list(plane_shape(m, k, width))} for a [{m}, {k}] "
                f"e{ebits}m{mbits} weight, got {words.dtype} {list(words.shape)}; repack the weight."
            )
        word = words[rows, word_in_row(cols, width)]
        field = (word >> bit_offset(cols, width).astype(np.uint32)) & np.uint32((1 << width) - 1)
        codes |= field << np.uint32(shift)
    return codes.astype(np.uint8)


def unsupported_shape_reason(m: int, k: int) -> str | None:
    """None when the FPx GEMM takes an [m, k] weight, else the constraint it breaks (one phrase).

    The planes are padded along K, so the layout takes any shape; the mma.m16n8k16 template needs M
    and K in multiples of 16.
    """
    if m % 16 or k % 16:
        return "M and K must be multiples of 16"
    return None
