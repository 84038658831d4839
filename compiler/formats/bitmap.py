"""bitmap: unstructured-sparse weights as a bitmask per tile plus the packed nonzero values (SpInfer,
EuroSys'25): 2 B per nonzero + 1 bit per weight + 4 B per tile.

W[M, K] is cut in tiles of 16 rows x 64 columns (the last row / column of tiles padded with zeros).
Tile (tm, tk) covers rows 16 tm .. 16 tm + 15 and columns 64 tk .. 64 tk + 63; inside it, position
p = 64 r + c (r, c: row and column in the tile, row-major) is bit p % 32 of word p // 32:

    tile (tm, tk)         c = 0 ........ 31 | 32 ........ 63
        r = 0             word 0            | word 1              bit set = W nonzero there
        r = 1             word 2            | word 3
        ...
        r = 15            word 30           | word 31

    stored "bits":    uint32  [TM, TK, 32]    TM = ceil(M / 16), TK = ceil(K / 64)
    stored "offsets": int32   [TM, TK]        index in "values" of the tile's first nonzero
    stored "values":  float16 [V]             the nonzeros, tile after tile (tm-major), row-major in a
                                              tile; V = nnz + 2 rounded up to a multiple of 8 (zeros)

    W[row, col] = bit(row, col) ? values[offsets[tm, tk] + popcount(the tile's bits before p)] : 0
    popcount(bits before p) = sum over words j of popcount(bits[tm, tk, j] & mask_j),
        mask_j = the low clamp(p - 32 j, 0, 32) bits: all ones for j < p // 32, the low p % 32 bits
        for j = p // 32, none after (one clamp per word, no nested selects: 0 spills at 64 registers)

The values array holds at least two spare slots, so the index of any position and the one after it
are in bounds (the decode may load before it selects). The packer does not prune: it stores W's
nonzeros as they are, rounded to fp16 (a weight that rounds to zero in fp16 is stored as a set bit
with value 0; -0.0 is a nonzero bit pattern and is kept). Pruning is `compiler/pruning.py`'s, before
packing.

Why 16 x 64: the per-tile offset costs 4 B per 1024 weights (0.03 bit per weight), so an 80%-sparse
weight stores 0.2 x 2 B + 1/8 B + 1/256 B = 0.529 B per weight, 3.78x fewer bytes than fp16, close to
the bitmap's limit (3.8x); a row of a tile is two words, so the GEMM's 16-row mma tiles and 64-column K
tiles cover whole tiles. The price is up to 32 masked popcounts per decoded weight (one per word of
the tile), which a plain global-memory decode pays in full (the PrimFunc's definition of W, the CPU's
path). The Tensor Core template pays per nonzero instead: it zero-fills each W tile and scatters the
nonzeros over the set bits of the tile's words (`bit_scatter`, the stage's tile scatter: a thread a tile
row, its rank the tile's offset + the set bits of the rows above, counted by the CTA in shared memory;
`SCATTER_CHUNK` set bits a loop trip; `schedules/tile_scatter.py`). Runs along K (`tile_run`: the
rows above popcounted once per run of a tile row, then the rank advances by one bit a weight) are what
it did before; the scatter costs fewer instructions at 80% sparsity
(benchmarks/results/gemm_sass_sm_90a_sparse.md). Above FRAGMENT_MIN_DENSITY (33 %) the template
decodes W straight into the mma B fragments instead (`fragment_pair`, `fragment_rank`: each lane counts
its two rows' set bits from the staged bit words once a 16 x 64 unit, the template's scan of those
counts across the warp gives the rows above each, then per pair of weights a popcount and two value
loads), whose cost does not depend on the density: 8.6 instructions a weight against the scatter's
11.6 at 50 % sparsity, 9.8 at 65 %, 9.15 at 70 % and 7.75 at 80 % (sm_90a, n16m128k64; fragment decode
ahead on 6-7 of the 7 shipped tiles up to 65 %, behind on 4-5 from 70 %).

Stored bytes depend on the nonzero count: `stored_bytes(m, k)` gives the bytes at the break-even
density (fp16's bytes, about 93.5% dense); the packed weight's `nbytes` is what the manifest reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tensorpress.compiler.formats.base import PackedWeight, WeightFormat, check_weight
from tensorpress.errors import TensorpressError
from tensorpress.schedules.decode_stage import DecodeStage, KRuns, SetBits, TileScatter

TILE_ROWS, TILE_COLS = 16, 64
WORD_BITS = 32
WORDS_PER_TILE = TILE_ROWS * TILE_COLS // WORD_BITS  # 32
VALUES_MULTIPLE = 8  # 16 bytes of fp16: a 128-bit load never runs past the array
VALUES_SPARE = 2  # zeros after the nonzeros: the decode loads the values at rank and rank + 1 of any position


def tile_grid(m: int, k: int) -> tuple[int, int]:
    """(TM, TK): the number of tiles along M and along K."""
    return -(-m // TILE_ROWS), -(-k // TILE_COLS)


def tiled(a: np.ndarray) -> np.ndarray:
    """[M, K] -> [TM, TK, TILE_ROWS * TILE_COLS] (zero padded), each tile's positions row-major."""
    m, k = a.shape
    tm, tk = tile_grid(m, k)
    padded = np.zeros((tm * TILE_ROWS, tk * TILE_COLS), a.dtype)
    padded[:m, :k] = a
    return padded.reshape(tm, TILE_ROWS, tk, TILE_COLS).transpose(0, 2, 1, 3).reshape(tm, tk, -1)


def untiled(t: np.ndarray, m: int, k: int) -> np.ndarray:
    """Inverse of `tiled`: [TM, TK, TILE_ROWS * TILE_COLS] -> [m, k] (the padding dropped)."""
    tm, tk, _ = t.shape
    return t.reshape(tm, tk, TILE_ROWS, TILE_COLS).transpose(0, 2, 1, 3).reshape(tm * TILE_ROWS, -1)[:m, :k]


def tile_bits(nonzero: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """("bits" uint32 [TM, TK, 32], "offsets" int32 [TM, TK]) of a mask bool [TM, TK, 1024] (`tiled`
    order): each tile's positions as bits, and the count of set positions in the tiles before it."""
    weights = (np.uint64(1) << np.arange(WORD_BITS, dtype=np.uint64)).astype(np.uint64)
    words = nonzero.reshape(*nonzero.shape[:2], WORDS_PER_TILE, WORD_BITS).astype(np.uint64) @ weights
    counts = nonzero.sum(axis=2).reshape(-1)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32).reshape(nonzero.shape[:2])
    return words.astype(np.uint32), offsets


def tile_positions(bits: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(set bool [TM, TK, 1024], index int64 [TM, TK, 1024]): per position of each tile, whether its bit
    is set, and offsets[tile] + the set bits before it (the index of its value when set)."""
    shifts = np.arange(WORD_BITS, dtype=np.uint32)
    nonzero = ((bits[..., None] >> shifts) & np.uint32(1)).astype(bool).reshape(*bits.shape[:2], -1)
    rank = np.cumsum(nonzero, axis=2) - nonzero  # nonzeros before each position in its tile
    return nonzero, offsets[..., None].astype(np.int64) + rank


def tile_rank(bits, offsets, row, col):
    """TIR (is_set, index) of W[row, col]: whether its bit is set and offsets[tile] + the set bits of
    its tile before its position (the module docstring's popcount, one clamp per word)."""
    from tvm import tirx

    tm, tk = row // TILE_ROWS, col // TILE_COLS
    position = (row % TILE_ROWS) * TILE_COLS + col % TILE_COLS
    word, bit = position // WORD_BITS, (position % WORD_BITS).astype("uint32")
    one = tirx.const(1, "uint32")
    rank = tirx.const(0, "int32")
    for j in range(WORDS_PER_TILE):
        # bits of word j before `position`: all 32 (j < word), the low `bit` (j == word) or none
        before = tirx.min(tirx.max(position - WORD_BITS * j, 0), WORD_BITS).astype("uint32")
        low = (one << (before & tirx.const(WORD_BITS - 1, "uint32"))) - one  # no shift by 32: undefined in C
        mask = tirx.Select(before == WORD_BITS, tirx.const(0xFFFFFFFF, "uint32"), low)
        rank = rank + tirx.popcount(bits[tm, tk, j] & mask).astype("int32")
    is_set = ((bits[tm, tk, word] >> bit) & one) != tirx.const(0, "uint32")
    return is_set, offsets[tm, tk] + rank


RUN_LENGTHS = (64, 32)  # runs along K the decode shares work over: a row of a tile, one mask word


def tile_run(bits, offsets, row, col0, length: int, bind):
    """TIR (is_set, index) of the run W[row, col0 .. col0 + length), col0 a multiple of `length` in
    RUN_LENGTHS (a run never leaves its tile or word pair): per weight of the run its bit (uint32 0 / 1)
    and its index in the values. `bind(name, value)` computes a value once for the run (the
    template's registers, `decode_stage.py` "Runs along K").

    The rank is computed once per run and advances by one bit per weight (no popcount a weight):
        rank(col0) = offsets[tile] + popcounts of the tile rows above `row` (15 row pairs, selected)
                     + popcount(the row's first word) when the run starts in its second word
        rank(col + 1) = rank(col) + bit(col)
    """
    from tvm import tirx

    rank, words = run_start(bits, offsets, row, col0, length, bind)
    one = tirx.const(1, "uint32")
    is_set, index = [], []
    for i in range(length):
        bit = bind(f"bit{i}", (words[i // WORD_BITS] >> tirx.const(i % WORD_BITS, "uint32")) & one)
        is_set.append(bit)
        index.append(rank)
        if i + 1 < length:
            rank = bind(f"rank{i + 1}", rank + bit.astype("int32"))
    return is_set, index


def run_start(bits, offsets, row, col0, length: int, bind):
    """TIR (rank, words) of the run W[row, col0 .. col0 + length) (`tile_run`): the index of the run's
    first weight as if it were set (bound "rank0"), and the run's mask words (bound "word0", ...)."""
    from tvm import tirx

    assert length in RUN_LENGTHS, length
    tm, tk, r = row // TILE_ROWS, col0 // TILE_COLS, row % TILE_ROWS
    half = (col0 % TILE_COLS) // WORD_BITS  # 0: the run starts in the row's first word, 1: its second

    def popc(word):
        return tirx.popcount(word).astype("int32")

    zero = tirx.const(0, "int32")
    rank = offsets[tm, tk]
    # bound before they are selected: TVM lowers a select of loads to a branch (every word is in bounds)
    for q in range(TILE_ROWS - 1):  # the rows above r: both words of each
        pair = bind(f"row{q}", popc(bits[tm, tk, 2 * q]) + popc(bits[tm, tk, 2 * q + 1]))
        rank = rank + tirx.Select(q < r, pair, zero)
    if length < TILE_COLS:
        rank = rank + tirx.Select(half == 1, bind("first_word", popc(bits[tm, tk, 2 * r])), zero)
    rank = bind("rank0", rank)
    return rank, [bind(f"word{w}", bits[tm, tk, 2 * r + half + w]) for w in range(length // WORD_BITS)]


def kept_if(bit, value):
    """float16 `value` where the uint32 `bit` is 1, +0 where it is 0, without a predicate: the pattern
    masked with bit * 0xFFFF (a select of 64 values a run held 64 predicates and spilled on sm_80; and
    not 0 - bit, which the CPU replay stored as all zeros)."""
    from tvm import tirx

    mask = (bit * tirx.const(0xFFFF, "uint32")).astype("uint16")
    return tirx.reinterpret("float16", tirx.reinterpret("uint16", value) & mask)


def fragment_words(bits, row, col, bind):
    """TIR [word0, word1] (bound): the mask words of W[row, col]'s tile row. A tile beyond the stored
    ones (K padded past the last tile) reads as no bits, whatever the staged words there hold."""
    from tvm import tirx

    tm, tk, r = row // TILE_ROWS, col // TILE_COLS, row % TILE_ROWS
    stored_tile = tk < int(bits.shape[1])
    none = tirx.const(0, "uint32")
    # a select of a load is lowered to a branch: bound (loaded), then 0 or it
    return [bind(f"word{h}", tirx.Select(stored_tile, bits[tm, tk, 2 * r + h], none)) for h in range(2)]


def _popc(word):
    from tvm import tirx

    return tirx.popcount(word).astype("int32")


def fragment_row_count(bits, row, col0, bind):
    """TIR int32: the set bits of W[row, col0]'s tile row (what it adds to the ranks of the rows below)."""
    words = fragment_words(bits, row, col0, bind)
    return _popc(words[0]) + _popc(words[1])


def fragment_rank(bits, offsets, row, col, bind, rows_above):
    """TIR (rank, word, shift) of the pair W[row, col], W[row, col + 1] (col even, one word): the index
    of W[row, col]'s value if set, the row's mask word holding both bits, and the first bit's place.

        rank = offsets[tile] + rows_above (the set bits of the tile rows above, `fragment_row_count`
               summed by the template's scan across lanes) + popcount(the row's first word) when col
               is in its second + popcount(word below the bit)

    A tile beyond the stored ones reads as no bits and offset 0: every index in bounds. `bind` shares a
    row's work between pairs.
    """
    from tvm import tirx

    tiles_k = int(bits.shape[1])
    tm, tk = row // TILE_ROWS, col // TILE_COLS
    c = col % TILE_COLS
    shift = (c % WORD_BITS).astype("uint32")
    offset = bind("offset", tirx.Select(tk < tiles_k, offsets[tm, tirx.min(tk, tiles_k - 1)], 0))
    words = fragment_words(bits, row, col, bind)
    half = c // WORD_BITS
    word = tirx.Select(half == 1, words[1], words[0])
    rank = bind("rank", offset + rows_above + _popc(words[0]) * half)
    return rank + _popc(word & ((tirx.const(1, "uint32") << shift) - tirx.const(1, "uint32"))), word, shift


@dataclass(frozen=True)
class BitmapFormat(WeightFormat):
    """Per 16 x 64 tile a bitmask and the packed fp16 nonzeros (see the module docstring)."""

    name: str = "bitmap"
    sparse: ClassVar[bool] = True
    auto_targets: ClassVar[tuple[str, ...]] = ("cuda",)  # the CPU decode pays for every weight: ellpack there

    def pack(self, w: np.ndarray) -> PackedWeight:
        w = check_weight(w)
        if not np.isfinite(w).all():
            raise TensorpressError("bitmap cannot store a weight holding inf or NaN; check the model's weights.")
        m, k = w.shape
        with np.errstate(over="ignore"):
            w16 = w.astype(np.float16)
        if not np.isfinite(w16).all():
            raise TensorpressError("bitmap stores fp16 values; this weight has values beyond fp16's range.")
        tiles = tiled(w16)  # [TM, TK, 1024]
        nonzero = tiles.view(np.uint16) != 0  # bit patterns: -0.0 counts as a stored value
        words, offsets = tile_bits(nonzero)
        nnz = int(nonzero.sum())
        size = -(-(nnz + VALUES_SPARE) // VALUES_MULTIPLE) * VALUES_MULTIPLE
        values = np.zeros(size, np.float16)
        values[:nnz] = tiles[nonzero]  # tile-major, row-major inside a tile (C order of `tiles`)
        arrays = {"bits": words, "offsets": offsets, "values": values}
        return PackedWeight(self.name, (m, k), arrays)

    def unpack(self, packed: PackedWeight) -> np.ndarray:
        m, k = packed.shape
        bits, offsets, values = (packed.arrays[n] for n in ("bits", "offsets", "values"))
        nonzero, index = tile_positions(bits, offsets)
        tiles = np.where(nonzero, values[np.minimum(index, values.size - 1)], np.float16(0))
        return untiled(tiles, m, k).astype(np.float32)

    def stored_bytes(self, m: int, k: int) -> int:
        """The bytes at the break-even density (those of fp16): the real count is the packed weight's."""
        return 2 * m * k

    def sparse_bytes(self, m: int, k: int, row_nonzeros: np.ndarray) -> int:
        tm, tk = tile_grid(m, k)
        values = -(-(int(row_nonzeros.sum()) + VALUES_SPARE) // VALUES_MULTIPLE) * VALUES_MULTIPLE
        return 2 * values + tm * tk * (WORDS_PER_TILE + 1) * 4

    def code_bits(self) -> int:
        return 16

    def decode_stage(self) -> BitmapDecode:
        return BitmapDecode(self.name)


FRAGMENT_MIN_DENSITY = 0.33  # above it the template decodes bitmap W into B fragments, not by scatter
SCATTER_CHUNK = 4  # set bits a trip of the scatter's loop (benchmarks/results/gemm_sass_sm_90a_sparse.md)


def bit_scatter(value, chunk: int, values=None, redirect_missing: bool = False) -> TileScatter:
    """The tile scatter of a bitmap's tiles (`decode_stage.py`, "Tile scatter", bitmap words): the
    "bits" words of tile (tm, tk) (stored first, [TM, TK, 32] read flat), its first nonzero's index
    offsets[tm, tk] (stored second), and value(stored, index) the nonzero of that index; `chunk` set
    bits a loop trip, their values by `values` when given (`SetBits`, as `redirect_missing`)."""

    def word_range(stored, tile_row, tile_col):
        first = (tile_row * int(stored[0].shape[1]) + tile_col) * WORDS_PER_TILE
        return first, first + WORDS_PER_TILE

    return TileScatter(
        tile_rows=TILE_ROWS,
        tile_cols=TILE_COLS,
        words=0,
        word_range=word_range,
        vector=WORDS_PER_TILE // TILE_ROWS,  # a tile row a thread (one 64-bit load): more busy lanes a warp
        set_bits=SetBits(
            first_index=lambda stored, tile_row, tile_col: stored[1][tile_row, tile_col],
            value=value,
            chunk=chunk,
            values=values,
            redirect_missing=redirect_missing,
        ),
    )


class BitmapDecode(DecodeStage):
    """W[m, k] from the tile's bits, offset and values; a plain global-memory decode. Capabilities: a
    tile scatter over the set bits (`bit_scatter`: the Tensor Core template's W tiles up to
    FRAGMENT_MIN_DENSITY), fragment decode from the staged bits (`fragment_pair`: above it) and runs
    along K (`tile_run`: the rank shared by a run of a tile row)."""

    def __init__(self, name: str):
        self.name = name
        self.k_runs = KRuns(RUN_LENGTHS, self.decode_run)
        self.tile_scatter = bit_scatter(lambda stored, index: stored[2][index], SCATTER_CHUNK)

    fragment_k = TILE_COLS  # a fragment-decode unit: 16 rows x one tile's 64 columns (a lane: 2 rows)

    def staged_buffers(self, m: int, k: int) -> list[str]:
        """The bit words (a K tile of them is [block_m / 16, block_k / 64, 32]); offsets and values stay
        global (the values a lane reads follow the data)."""
        return ["bits"]

    def fragment_decode_preferred(self, stored: list, m: int, k: int) -> bool:
        """Fragment decode costs the same at any density, the scatter a loop trip per set bit: the
        template takes fragment decode above FRAGMENT_MIN_DENSITY (gemm_sass_sm_90a_sparse.md), the
        nonzeros counted from the values' length (at least it - the spare slots and the rounding; a
        kernel built for a larger capacity, as the GPU kit's, counts that)."""
        fewest_nonzeros = int(stored[2].shape[0]) - VALUES_SPARE - (VALUES_MULTIPLE - 1)
        return fewest_nonzeros > FRAGMENT_MIN_DENSITY * m * k

    fragment_counts_rows = True  # a lane counts its two rows; the template scans the counts across lanes

    def fragment_row_count(self, stored, row, col0, bind):
        return fragment_row_count(stored[0], row, col0, bind)

    def fragment_pair(self, stored, row, col, bind=None, rows_above=None):
        """The fp16 patterns of W[row, col], W[row, col + 1] (col even) from the staged bit words,
        the tile offset, the set bits of the rows above (the template's `rows_above`) and the values
        (`fragment_rank`): a lane's rank of its row once a unit."""
        from tvm import tirx

        bits, offsets, values = stored
        bind = bind or (lambda name, value: value)
        if rows_above is None:
            raise ValueError("internal: bitmap's fragment decode takes the rows above from the template's scan")
        rank, word, shift = fragment_rank(bits, offsets, row, col, bind, rows_above)
        # both loaded (VALUES_SPARE keeps rank + 1 in bounds), then selected: a select of loads is a branch
        low = bind("low", tirx.reinterpret("uint16", values[rank]).astype("uint32"))
        high = bind("high", tirx.reinterpret("uint16", values[rank + 1]).astype("uint32"))
        zero = tirx.const(0, "uint32")
        first = (word & (tirx.const(1, "uint32") << shift)) != zero
        second = (word & (tirx.const(2, "uint32") << shift)) != zero
        lo = tirx.Select(first, low, zero)
        hi = tirx.Select(second, tirx.Select(first, high, low), zero)  # the second's rank: + the first's bit
        return lo | (hi << tirx.const(16, "uint32"))

    def decode_run(self, stored, row, col0, length: int, dtype: str, bind):
        bits, offsets, values = stored
        is_set, index = tile_run(bits, offsets, row, col0, length, bind)
        # loaded unconditionally (the spare value keeps every index in bounds), then masked: a select
        # of a load is lowered to a branch per weight
        loaded = [bind(f"value{n}", values[i]) for n, i in enumerate(index)]
        return [kept_if(s, v).astype(dtype) for s, v in zip(is_set, loaded)]

    def decode(self, stored, row, col, dtype: str):
        from tvm import tirx

        bits, offsets, values = stored
        is_set, index = tile_rank(bits, offsets, row, col)
        return tirx.Select(is_set, values[index].astype(dtype), tirx.const(0, dtype))
