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

    stored "words":   uint32 [S]            every tile's words, tile after tile (tm-major); S a multiple of 4
    stored "offsets": int32  [TM, TK + 1]   tile (tm, tk) holds words offsets[tm, tk] .. offsets[tm, tk + 1] - 1;
                                            offsets[tm, TK] == offsets[tm + 1, 0] (a row's end, the next's start)

    W tile = zeros, then for each word of the tile: W[16 tm + p // 64, 64 tk + p % 64] = value(word)

Why [TM, TK + 1] and not one flat run of TM*TK + 1 offsets: a tile's word range then follows from the
buffer's shape alone (TK = its columns - 1), which the TIR decode needs (it never hears of K).

Counts are padded to a multiple of 4 words so that a tile's words are whole 128-bit loads. A padding
word is a copy of the tile's last nonzero: the decode scatters each word in any order, and writing a
value twice where it already is changes nothing (a zero-valued padding word could land on a nonzero,
and a fully dense tile has no zero position to send it to). An empty tile stores no word.

Bytes: 4 B per nonzero (padding: at most 3 words a tile) + 4 B per tile; 80% sparse: 0.8 B a weight,
2.5x fewer than fp16 (the bitmap stores 0.53 B, fewer below ~94% sparsity; Tiled-CSL's decode is cheaper:
no popcount, one shared store per nonzero). The packer does not prune: it stores W's nonzeros rounded
to fp16 (-0.0 is a nonzero bit pattern and is kept, a weight that rounds to zero in fp16 is stored as 0).

Decode stage (`TiledCSLDecode`): a scatter, not a gather. W[m, k] alone would need a search of its
tile's words (11 dependent loads; as one TIR expression TVM 0.27's region analyses take exponential
time over it), so the stage offers no `decode` and declares the tile-scatter capability instead
(`schedules/decode_stage.py`, `TileScatter`): tile (tm, tk) is zeros, then each word's value at its
position. `make_weight_gemm` builds its "decode" block from it, one thread walking every tile
(`schedules/tile_scatter.py`): that block is the format's one TIR definition, which the tests compare
with `unpack`, and what the CPU runs (once per call: zero-fill W, store the nonzeros, then the dense
micro-kernel reads it: the cost of a dense fp32 W write per call, so `auto` never picks it on the CPU;
ellpack multiplies the nonzeros only). The Tensor Core template builds each shared W tile the same
way with the CTA's threads (128-bit loads of 4 words, padded rows for ldmatrix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tensorpress.compiler.formats.base import PackedWeight, WeightFormat, check_weight
from tensorpress.compiler.formats.bitmap import TILE_COLS, TILE_ROWS, tile_grid, tiled, untiled
from tensorpress.errors import TensorpressError
from tensorpress.schedules.decode_stage import DecodeStage, TileScatter

WORDS_MULTIPLE = 4  # a tile's words are whole 128-bit loads
POSITION_BITS = 16
POSITION_MASK = (1 << POSITION_BITS) - 1


def pack_tiled_csl(w: np.ndarray) -> dict[str, np.ndarray]:
    """{"words": uint32 [S], "offsets": int32 [TM, TK + 1]} of float W[M, K] (see the module docstring)."""
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype.kind != "f":
        raise TensorpressError(f"tiled-csl packs a 2-D float weight [M, K], got {w.dtype} {w.shape}.")
    if not np.isfinite(w).all():
        raise TensorpressError("tiled-csl cannot store a weight holding inf or NaN; check the model's weights.")
    with np.errstate(over="ignore"):
        w16 = w.astype(np.float16)
    if not np.isfinite(w16).all():
        raise TensorpressError("tiled-csl stores fp16 values; this weight has values beyond fp16's range.")
    grid = tile_grid(*w.shape)
    tiles = tiled(w16).reshape(-1, TILE_ROWS * TILE_COLS)  # [T, 1024], tm-major
    patterns = tiles.view(np.uint16)
    nonzero = patterns != 0  # bit patterns: -0.0 counts as a stored value
    counts = nonzero.sum(axis=1)
    padded = -(-counts // WORDS_MULTIPLE) * WORDS_MULTIPLE
    flat = np.concatenate([[0], np.cumsum(padded)]).astype(np.int32)  # tile t: flat[t] .. flat[t + 1]
    tile_of, position = np.nonzero(nonzero)  # tile-major, position order inside a tile
    real = (patterns[tile_of, position].astype(np.uint32) << np.uint32(POSITION_BITS)) | position.astype(np.uint32)
    words = np.zeros(int(flat[-1]), np.uint32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = flat[tile_of] + (np.arange(tile_of.size) - starts[tile_of])
    words[slot] = real
    for t in np.nonzero(padded > counts)[0]:  # padding: copies of the tile's last nonzero
        last = flat[t] + counts[t] - 1
        words[last + 1 : flat[t + 1]] = words[last]
    return {"words": words, "offsets": row_offsets(flat, *grid)}


def row_offsets(flat: np.ndarray, tm: int, tk: int) -> np.ndarray:
    """int32 [TM, TK + 1] from the TM*TK + 1 running word counts `flat`: row tm holds the starts of its
    tiles and the end of its last one."""
    index = np.arange(tm)[:, None] * tk + np.arange(tk + 1)[None, :]
    return flat[index].astype(np.int32)


def unpack_tiled_csl(arrays: dict[str, np.ndarray], m: int, k: int) -> np.ndarray:
    """float32 [m, k]: every tile zero-filled, then each word's value scattered to its position."""
    words, offsets = np.asarray(arrays["words"]), np.asarray(arrays["offsets"])
    tm, tk = tile_grid(m, k)
    if words.dtype != np.uint32 or offsets.dtype != np.int32 or offsets.shape != (tm, tk + 1):
        raise TensorpressError(f"tiled-csl arrays do not fit a [{m}, {k}] weight; repack it.")
    flat = np.concatenate([offsets[:, :-1].reshape(-1), offsets[-1:, -1]])
    joined = (offsets[1:, 0] == offsets[:-1, -1]).all()
    if not joined or (np.diff(flat) % WORDS_MULTIPLE).any() or flat[0] != 0 or flat[-1] != words.size:
        raise TensorpressError("tiled-csl offsets must start at 0, end at the word count and step by 4s.")
    tile_of = np.repeat(np.arange(tm * tk), np.diff(flat))
    position = (words & np.uint32(POSITION_MASK)).astype(np.int64)
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
    return int(padded.sum()) * 4 + tm * (tk + 1) * 4


@dataclass(frozen=True)
class TiledCSLFormat(WeightFormat):
    """Per 16 x 64 tile its nonzeros as (fp16 value | position) words (see the module docstring)."""

    name: str = "tiled-csl"
    sparse: ClassVar[bool] = True
    # The CPU decode searches every weight (see the module docstring): ellpack there.
    auto_targets: ClassVar[tuple[str, ...]] = ("cuda",)

    def pack(self, w: np.ndarray) -> PackedWeight:
        w = check_weight(w)
        return PackedWeight(self.name, w.shape, pack_tiled_csl(w))

    def unpack(self, packed: PackedWeight) -> np.ndarray:
        return unpack_tiled_csl(packed.arrays, *packed.shape)

    def stored_bytes(self, m: int, k: int) -> int:
        """The bytes at the break-even density (those of fp16): the real count is the packed weight's."""
        return 2 * m * k

    def sparse_bytes(self, m: int, k: int, row_nonzeros: np.ndarray) -> int:
        """An upper bound from the row counts: 4 B a nonzero, at most 3 padding words a tile, the offsets."""
        tm, tk = tile_grid(m, k)
        return 4 * int(row_nonzeros.sum()) + 4 * (WORDS_MULTIPLE - 1) * tm * tk + 4 * tm * (tk + 1)

    def code_bits(self) -> int:
        return 16

    def decode_stage(self) -> TiledCSLDecode:
        return TiledCSLDecode(self.name)


def word_position(word):
    """TIR int32: the position p = 64 r + c a word holds (its low 16 bits)."""
    from tvm import tirx

    return (word & tirx.const(POSITION_MASK, "uint32")).astype("int32")


def word_value(word):
    """TIR float16: the value a word holds (its high 16 bits)."""
    from tvm import tirx

    return tirx.reinterpret("float16", (word >> tirx.const(POSITION_BITS, "uint32")).astype("uint16"))


class TiledCSLDecode(DecodeStage):
    """W as each tile's words scattered into a zero-filled tile (`TileScatter`); no per-element decode."""

    decodes_elements = False

    def __init__(self, name: str):
        self.name = name
        self.tile_scatter = TileScatter(
            tile_rows=TILE_ROWS,
            tile_cols=TILE_COLS,
            words=0,
            word_range=self._word_range,
            element=self._element,
        )

    @staticmethod
    def _word_range(stored, tile_row, tile_col):
        _, offsets = stored
        return offsets[tile_row, tile_col], offsets[tile_row, tile_col + 1]

    @staticmethod
    def _element(word):
        position = word_position(word)
        return position // TILE_COLS, position % TILE_COLS, word_value(word)

    def decode(self, stored, row, col, dtype: str):
        raise NotImplementedError(
            "tiled-csl is a scatter, not a per-element gather: kernels build W from its tile_scatter"
        )
