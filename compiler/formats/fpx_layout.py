"""The bit-plane layout in which FPx codes travel to the GPU (pure numpy and integer arithmetic).

A b-bit code (b = 1 + X + Y) is split into power-of-two bit planes, widest first, the widest plane
holding the code's lowest bits (6 = 4 + 2, 5 = 4 + 1, 4 = 4, 7 = 4 + 2 + 1, 8 = 8):

    e3m2 code   s e e e m m          e2m2 code   s e e m m
    plane2      s e                  plane1      s
    plane4          e e m m          plane4        e e m m

Each plane is its own uint32 array in which every code has the same width p, so a p-bit field never
straddles a word, and 32 codes fill exactly p words. The weight W[M, K] is padded with zero codes to
[Mp, Kp], multiples of TILE_ROWS and TILE_K, and cut into tiles; one plane's words are laid out

    tile order (row-major over tiles; each tile is one contiguous run of TILE_ROWS*TILE_K*p/32 words,
    so a thread block's tile is a single coalesced stream of 128-bit loads):

        | tile(0,0) | tile(0,1) | ... | tile(0,Kp/TILE_K-1) | tile(1,0) | ...

    inside a tile: TILE_K/32 groups of 32 along K; a group holds every row's p words:

        | group 0: row 0 [p words] row 1 [p words] ... row TILE_ROWS-1 [p words] | group 1: ... |

    inside a row's group: the 32 codes of K positions k0 .. k0+31 in mma.m16n8k16 A-fragment order,
    slot s at bits [(s*p) % 32, +p) of word (s*p) // 32 (least significant bits first):

        slot      0  1  2  3  4  5  6  7 | 8  9 10 11 12 13 14 15 | ... | 24 25 26 27 28 29 30 31
        k - k0    0  1  8  9 16 17 24 25 | 2  3 10 11 18 19 26 27 | ... |  6  7 14 15 22 23 30 31
                  '--- lane 4g+0 -------' '--- lane 4g+1 --------'       '--- lane 4g+3 --------'

So the 8 codes a lane (4g + c) feeds to two m16n8k16 steps for one row are slots 8c .. 8c+7: one
contiguous run of 8p bits (one word of plane4, half a word of plane2, a byte of plane1, two words of
plane8), and shared-memory reads of a warp (32-bit; 64-bit for plane8) are free of bank conflicts.

The layout is written once, as integer arithmetic on (row, col) that works on numpy arrays and on
TVM PrimExprs alike (`word_index`, `bit_offset`); the TIR decode stage and `unpack_fpx_planes` both
use it, and `pack_fpx_planes` builds the same layout independently by reshapes, so tests cross-check
the two. Change the tiling here only.
"""

from __future__ import annotations

import numpy as np

from tensorpress.compiler.formats.fpx import check_format, code_bits
from tensorpress.errors import TensorpressError

WORD_BITS = 32
GROUP_K = 32  # codes along K whose p-bit fields fill exactly p words
TILE_ROWS = 64  # rows in one contiguous tile (a thread block's M tile)
TILE_K = 64  # K extent of one contiguous tile (a pipeline stage's K slice); a multiple of GROUP_K
GROUPS_PER_TILE = TILE_K // GROUP_K

# slot (position inside a group's bit string) -> K offset inside the group, see the picture above.
SLOT_TO_K = np.array(
    [16 * step + 8 * half + 2 * lane + pair for lane in range(4) for step in range(2) for half in range(2)
     for pair in range(2)],
    dtype=np.int64,
)  # fmt: skip


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


def padded_shape(m: int, k: int) -> tuple[int, int]:
    """[Mp, Kp]: M and K rounded up to multiples of TILE_ROWS and TILE_K."""
    return -(-m // TILE_ROWS) * TILE_ROWS, -(-k // TILE_K) * TILE_K


def plane_words(m: int, k: int, width: int) -> int:
    """Number of uint32 words of the `width`-bit plane for an [m, k] weight (padding included)."""
    mp, kp = padded_shape(m, k)
    return mp * kp * width // WORD_BITS


def slot_in_group(kk):
    """Slot of K offset kk (0 <= kk < 32) in its group: the inverse of SLOT_TO_K, as arithmetic."""
    return (kk % 8) // 2 * 8 + kk // 16 * 4 + (kk % 16) // 8 * 2 + kk % 2


def word_index(row, col, width: int, k_padded: int):
    """Index of the word of the `width`-bit plane that holds the code of W[row, col].

    row, col: ints, numpy integer arrays or TVM integer PrimExprs; k_padded: padded_shape(m, k)[1].
    """
    tile = row // TILE_ROWS * (k_padded // TILE_K) + col // TILE_K
    group = tile * GROUPS_PER_TILE + col % TILE_K // GROUP_K
    slot = slot_in_group(col % GROUP_K)
    return (group * TILE_ROWS + row % TILE_ROWS) * width + slot * width // WORD_BITS


def bit_offset(col, width: int):
    """Lowest bit, inside its word, of the `width`-bit field of column `col` (same types as above)."""
    return slot_in_group(col % GROUP_K) * width % WORD_BITS


def pack_fpx_planes(codes: np.ndarray, ebits: int, mbits: int) -> dict[str, np.ndarray]:
    """Split eXmY codes uint8 [M, K] into bit planes in the kernel's layout (see the module docstring).

    Returns {"plane8"/"plane4"/"plane2"/"plane1": uint32 [plane_words(M, K, p)]}, widest plane first.
    """
    check_format(ebits, mbits)
    bits = code_bits(ebits, mbits)
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype != np.uint8:
        raise TensorpressError(f"FPx codes must be a 2-D uint8 array, got {codes.dtype} {codes.shape}.")
    if codes.size and int(codes.max()) >> bits:
        raise TensorpressError(f"FPx codes hold values above the {bits} bits of e{ebits}m{mbits}.")
    m, k = codes.shape
    mp, kp = padded_shape(m, k)
    padded = np.zeros((mp, kp), dtype=np.uint32)
    padded[:m, :k] = codes
    # [row tile, row, K tile, group, k in group] -> [row tile, K tile, group, row, slot]
    tiles = padded.reshape(mp // TILE_ROWS, TILE_ROWS, kp // TILE_K, GROUPS_PER_TILE, GROUP_K)
    tiles = tiles.transpose(0, 2, 3, 1, 4)[..., SLOT_TO_K]
    planes = {}
    for width, shift in zip(plane_widths(bits), plane_shifts(bits)):
        fields = (tiles >> np.uint32(shift)) & np.uint32((1 << width) - 1)
        per_word = WORD_BITS // width
        fields = fields.reshape(*fields.shape[:-1], width, per_word)
        lanes = (np.arange(per_word, dtype=np.uint32) * np.uint32(width)).astype(np.uint32)
        words = np.bitwise_or.reduce(fields << lanes, axis=-1)
        planes[plane_name(width)] = np.ascontiguousarray(words.reshape(-1), dtype=np.uint32)
    return planes


def unpack_fpx_planes(planes: dict[str, np.ndarray], m: int, k: int, ebits: int, mbits: int) -> np.ndarray:
    """Inverse of `pack_fpx_planes`: uint8 codes [m, k], gathered through `word_index`/`bit_offset`."""
    check_format(ebits, mbits)
    bits = code_bits(ebits, mbits)
    _, kp = padded_shape(m, k)
    rows = np.arange(m, dtype=np.int64)[:, None]
    cols = np.arange(k, dtype=np.int64)[None, :]
    codes = np.zeros((m, k), dtype=np.uint32)
    for width, shift in zip(plane_widths(bits), plane_shifts(bits)):
        words = np.asarray(planes[plane_name(width)])
        if words.dtype != np.uint32 or words.shape != (plane_words(m, k, width),):
            raise TensorpressError(
                f"FPx {plane_name(width)} must be uint32 [{plane_words(m, k, width)}] for a [{m}, {k}] "
                f"e{ebits}m{mbits} weight, got {words.dtype} {words.shape}."
            )
        word = words[word_index(rows, cols, width, kp)]
        field = (word >> bit_offset(cols, width).astype(np.uint32)) & np.uint32((1 << width) - 1)
        codes |= field << np.uint32(shift)
    return codes.astype(np.uint8)


def unsupported_shape_reason(m: int, k: int) -> str | None:
    """None when the FPx GEMM takes an [m, k] weight, else the constraint it breaks (one phrase).

    The planes are padded to whole tiles, so the layout takes any shape; the mma.m16n8k16 template
    needs M and K in multiples of 16.
    """
    if m % 16 or k % 16:
        return "M and K must be multiples of 16"
    return None
