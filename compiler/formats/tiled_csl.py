"""tiled-csl: unstructured-sparse weights as Flash-LLM's Tiled-CSL, in our own code and correct at any
density (a fully dense tile too): per tile, each nonzero one 32-bit word, its fp16 value and its position.

W[M, K] is cut in tiles of 16 rows x 64 columns, as `bitmap.py` does (the last row / column of tiles
padded with zeros); position p = 64 r + c of a tile (r, c: row and column in the tile, row-major).

    one word (uint32)        bit 31 ........ 16 | 15 ........ 0
                             fp16 value's bits  | position p (0 .. 1023)

    tile (tm, tk), 16 x 64        its words, in position order, then padding to a multiple of 4
      r=0   . a . . b ...         [ a|1  b|4  c|64  d|67 ] [ e|130  e|130  e|130  e|130 ]
      r=1   c . . d . ...           └── one 128-bit load ─┘  └ 1 nonzero + 3 copies of it ┘
      r=2   . . e . . ...

    stored "words":   uint32 [S]          every tile's words, tile after tile (tm-major); S a multiple of 4
    stored "offsets": int32  [TM*TK + 1]  tile t = tm TK + tk holds words offsets[t] .. offsets[t+1] - 1

    W tile = zeros, then for each word of the tile: W[16 tm + p // 64, 64 tk + p % 64] = value(word)

Counts are padded to a multiple of 4 words so that a tile's words are whole 128-bit loads. A padding
word is a copy of the tile's last nonzero: the decode scatters each word in any order, and writing a
value twice where it already is changes nothing (a zero-valued padding word could land on a nonzero,
and a fully dense tile has no zero position to send it to). An empty tile stores no word.

Bytes: 4 B per nonzero (padding: at most 3 words a tile) + 4 B per tile; 80% sparse: 0.8 B a weight,
2.5x fewer than fp16 (the bitmap stores 0.53 B, fewer below ~94% sparsity; Tiled-CSL's decode is cheaper:
no popcount, one shared store per nonzero). The packer does not prune: it stores W's nonzeros rounded
to fp16 (-0.0 is a nonzero bit pattern and is kept, a weight that rounds to zero in fp16 is stored as 0).

Numpy only for now: the scatter decode stage (zero-fill the shared W tile, then one store per word)
needs the Tensor Core template's scatter capability, which is not built yet, so the registry does not
list this format and `--sparse-format tiled-csl` is refused with that sentence.
"""

from __future__ import annotations

import numpy as np

from tensorpress.compiler.formats.bitmap import TILE_COLS, TILE_ROWS, tile_grid, tiled, untiled
from tensorpress.errors import TensorpressError

WORDS_MULTIPLE = 4  # a tile's words are whole 128-bit loads
POSITION_BITS = 16


def pack_tiled_csl(w: np.ndarray) -> dict[str, np.ndarray]:
    """{"words": uint32 [S], "offsets": int32 [TM*TK + 1]} of float W[M, K] (see the module docstring)."""
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype.kind != "f":
        raise TensorpressError(f"tiled-csl packs a 2-D float weight [M, K], got {w.dtype} {w.shape}.")
    if not np.isfinite(w).all():
        raise TensorpressError("tiled-csl cannot store a weight holding inf or NaN; check the model's weights.")
    with np.errstate(over="ignore"):
        w16 = w.astype(np.float16)
    if not np.isfinite(w16).all():
        raise TensorpressError("tiled-csl stores fp16 values; this weight has values beyond fp16's range.")
    tiles = tiled(w16).reshape(-1, TILE_ROWS * TILE_COLS)  # [T, 1024]
    patterns = tiles.view(np.uint16)
    nonzero = patterns != 0  # bit patterns: -0.0 counts as a stored value
    counts = nonzero.sum(axis=1)
    padded = -(-counts // WORDS_MULTIPLE) * WORDS_MULTIPLE
    offsets = np.concatenate([[0], np.cumsum(padded)]).astype(np.int32)
    tile_of, position = np.nonzero(nonzero)  # tile-major, position order inside a tile
    real = (patterns[tile_of, position].astype(np.uint32) << np.uint32(POSITION_BITS)) | position.astype(np.uint32)
    words = np.zeros(int(offsets[-1]), np.uint32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = offsets[tile_of] + (np.arange(tile_of.size) - starts[tile_of])
    words[slot] = real
    for t in np.nonzero(padded > counts)[0]:  # padding: copies of the tile's last nonzero
        last = offsets[t] + counts[t] - 1
        words[last + 1 : offsets[t + 1]] = words[last]
    return {"words": words, "offsets": offsets}


def unpack_tiled_csl(arrays: dict[str, np.ndarray], m: int, k: int) -> np.ndarray:
    """float32 [m, k]: every tile zero-filled, then each word's value scattered to its position."""
    words, offsets = np.asarray(arrays["words"]), np.asarray(arrays["offsets"])
    tm, tk = tile_grid(m, k)
    if words.dtype != np.uint32 or offsets.dtype != np.int32 or offsets.shape != (tm * tk + 1,):
        raise TensorpressError(f"tiled-csl arrays do not fit a [{m}, {k}] weight; repack it.")
    if (np.diff(offsets) % WORDS_MULTIPLE).any() or offsets[0] != 0 or offsets[-1] != words.size:
        raise TensorpressError("tiled-csl offsets must start at 0, end at the word count and step by 4s.")
    tile_of = np.repeat(np.arange(tm * tk), np.diff(offsets))
    position = (words & np.uint32(0xFFFF)).astype(np.int64)
    if (position >= TILE_ROWS * TILE_COLS).any():
        raise TensorpressError("a tiled-csl word holds a position outside its 16 x 64 tile; repack the weight.")
    values = (words >> np.uint32(POSITION_BITS)).astype(np.uint16).view(np.float16)
    tiles = np.zeros((tm * tk, TILE_ROWS * TILE_COLS), np.float16)
    tiles[tile_of, position] = values
    return untiled(tiles.reshape(tm, tk, -1), m, k).astype(np.float32)


def tiled_csl_bytes(m: int, k: int, tile_nonzeros: np.ndarray) -> int:
    """Bytes stored for an [m, k] weight with these nonzero counts per tile (int [TM*TK])."""
    padded = -(-np.asarray(tile_nonzeros, dtype=np.int64) // WORDS_MULTIPLE) * WORDS_MULTIPLE
    tm, tk = tile_grid(m, k)
    return int(padded.sum()) * 4 + (tm * tk + 1) * 4
