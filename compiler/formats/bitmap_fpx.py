"""bitmap x FPx: unstructured-sparse weights whose nonzeros are FPx codes (`--weights fp6 --sparsity 0.8`).

The bitmap of `bitmap.py` (16 x 64 tiles, a bit per weight, an offset per tile) says where the nonzeros
are; each nonzero is an eXmY code (`fpx_codes.py`) with FPx's fp16 scale per output row, and the codes
travel back to back in one bit string (`code_stream.py`: 6 bits a code for FP6, no bit planes: a run of
codes from any index is one funnel shift of two words).

    W[M, K] (pruned) ──FPx encode──▶ codes uint8 [M, K] + scales fp16 [M]     (fpx.FPxFormat.encode)
    bitmap of the codes that are not +0, per 16 x 64 tile                       (bitmap.tile_bits)

    stored "bits":     uint32  [TM, TK, 32]   bit p % 32 of word p // 32 set: position p of the tile
                                              (p = 64 r + c) holds a code other than +0 (bitmap.py's picture)
    stored "offsets":  int32   [TM, TK]       index in the code stream of the tile's first nonzero
    stored "codes":    uint32  [1, Vp b/32]   the nonzero b-bit codes, tile after tile (tm-major), row-major
                                              in a tile: code i is bits i b .. i b + b - 1 of the words
    stored "scales":   float16 [M]            FPx's per-row scale
        Vp = nnz + 33 rounded up to 32, zero codes: a spare code keeps the index of every position in
        bounds (the decode may load before it selects), a spare word the word after it (a run's window)

    tile (tm, tk) of the codes       the code stream
      r=0  . a . . b ...             ... │ a b c d e ... │ next tile's codes ...
      r=1  c . . d . ...                 ▲ offsets[tm, tk]
      ...                            codes word 0: │ f(low 2) e d c b a │ (FP6: 6 bits a code, lowest first)

    W[row, col] = bit(row, col) ? value(code[offsets[tm, tk] + popcount(bits before p)]) * scales[row] : 0

Bytes: FP6 stores 0.75 B per nonzero + 1/8 B per weight + 4 B per 1024 weights + 2 B per row: at 80%
sparsity 0.279 B a weight, 7.2x fewer than fp16 and 2.7x fewer than dense FP6. It stores fewer bytes than
dense FP6 below about 83% density (at 6 bits), which is what `--sparse-format auto` compares per layer.

Exactness: unpack(pack(w)) equals FPx's unpack(pack(w)) bit for bit (the same codes and scales; a code
of +0 is FPx's value +0, so leaving it out of the stream changes nothing; -0 is a stored code).

Decode stage (`BitmapFPxDecode`): bitmap's rank (`bitmap.tile_rank`) then the code, placed in an fp16
pattern by two masks and shifts (`FPxDecode.code_fp16_bits`), and FPx's row scale, applied once per
output in the GEMM's epilogue. On the Tensor Core template it scatters as bitmap does (`bit_scatter`:
after the zero-fill, the set bits `SCATTER_CHUNK` a loop trip, their codes from one window of the stream
at the trip's first rank, the next code 6 bits up, decoded in pairs (`chunk_values`); a trip's missing
bits store at its first bit's position, overwritten, instead of a branch around each store).
Its runs along K (`decode_run`, the template's `k_runs`, used before the scatter and by stages without
it) decode like this: a thread decodes a tile row's 64 weights, the rank of the rows
above popcounted once (`bitmap.run_start`); per chunk of 4 weights a rank (+ the previous chunk's
popcount) and the window of codes from it (`code_stream.window`: two loads and a funnel shift); per pair
of weights the window's lowest codes make a half2 of patterns (SWAR), masked by the two bits, and the
window advances one code past each set bit. Only a chunk's window is live: an earlier try that read every
code's words separately spilled (16 B on sm_90a for runs of 64, 4 B on sm_80 for runs of 32). The stream
was FPx's bit planes (plane4 + plane2, a window each) until runs: chunks of 8 then spilled 24 B at
n32m128k64 on sm_90a, keeping a window for the chunks whose codes it holds spilled 8 B on sm_80 (and 32
B on sm_90a for plane2's alone), and chunks of 4 cost 19.7 thread-instructions a weight at n16m128k64
(one string: 15.3). Tiles too small for whole warps of runs decode a weight a thread with the full rank.
Not staged: the rank reads all 32 words of a tile's bitmap and the tile's codes start at a
data-dependent offset (neither is a rectangle the template's cp.async copies).
On the CPU the panel schedule decodes each weight once per call; `auto` does not choose it there (its
rank costs every weight 32 popcounts: plain FPx, read word by word, is faster).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tensorpress.compiler.formats import code_stream
from tensorpress.compiler.formats.base import PackedWeight, WeightFormat, check_weight
from tensorpress.compiler.formats.bitmap import (
    RUN_LENGTHS,
    WORD_BITS,
    WORDS_PER_TILE,
    bit_scatter,
    run_start,
    tile_bits,
    tile_grid,
    tile_positions,
    tile_rank,
    tiled,
    untiled,
)
from tensorpress.compiler.formats.fpx import FPxDecode, FPxFormat, fpx_decode_stage, fpx_formats
from tensorpress.compiler.formats.fpx_codes import decode as decode_codes
from tensorpress.errors import TensorpressError
from tensorpress.schedules.decode_stage import DecodeStage, KRuns

LAYOUT = "bitmap"


SCATTER_CHUNK = 3  # set bits (codes) a trip of the tile scatter (benchmarks/results/gemm_sass_sm_90a_sparse.md)
SPARE_CODES = 1 + WORD_BITS  # a code past the last (a rank may reach it) and a word past its first bit's


def stream_length(nonzeros: int) -> int:
    """Vp: codes in the stream for `nonzeros` nonzeros (the spare codes, rounded up to 32: whole words for
    any code width)."""
    return -(-(nonzeros + SPARE_CODES) // WORD_BITS) * WORD_BITS


@dataclass(frozen=True)
class BitmapFPxFormat(WeightFormat):
    """bitmap tiles whose nonzeros are eXmY codes with a scale per row (see the module docstring)."""

    name: str
    ebits: int
    mbits: int
    scale_search: str = "absmax"

    sparse: ClassVar[bool] = True
    auto_targets: ClassVar[tuple[str, ...]] = ("cuda",)  # the CPU pays the rank per weight: plain FPx there

    @property
    def fpx(self) -> FPxFormat:
        """The FPx format of the nonzeros (its encode, scale search and codes)."""
        return FPxFormat(f"e{self.ebits}m{self.mbits}", self.ebits, self.mbits, self.scale_search)

    @property
    def sparse_layout(self) -> str:
        return LAYOUT

    @property
    def sparse_values(self) -> str:
        return self.fpx.stage_name

    def with_scale_search(self, scale_search: str) -> BitmapFPxFormat:
        return dataclasses.replace(self, scale_search=scale_search)

    def pack(self, w: np.ndarray) -> PackedWeight:
        return self.pack_codes(*self.fpx.encode(check_weight(w)))

    def pack_calibrated(self, w: np.ndarray, gram: np.ndarray) -> PackedWeight:
        return self.pack_codes(*self.fpx.encode_calibrated(check_weight(w), gram))

    def pack_codes(self, codes: np.ndarray, scales: np.ndarray) -> PackedWeight:
        """The stored arrays of eXmY codes uint8 [M, K] and their fp16 row scales [M]."""
        bits, offsets, nonzeros = tile_codes(codes)
        return self.pack_stream(codes.shape, bits, offsets, nonzeros, scales)

    def pack_stream(self, shape, bits, offsets, nonzeros: np.ndarray, scales: np.ndarray) -> PackedWeight:
        """The packed weight of `tile_codes`' arrays: the nonzero codes padded to `stream_length` zeros
        and packed back to back (`code_stream`)."""
        stream = np.zeros(stream_length(nonzeros.size), np.uint8)
        stream[: nonzeros.size] = nonzeros
        codes = code_stream.pack_stream(stream, self.code_bits())
        arrays = {"bits": bits, "offsets": offsets, code_stream.NAME: codes, "scales": scales}
        return PackedWeight(self.name, tuple(shape), arrays)

    def unpack(self, packed: PackedWeight) -> np.ndarray:
        if packed.format != self.name:
            raise TensorpressError(f"a {packed.format} weight cannot be unpacked as {self.name}.")
        m, k = packed.shape
        stream = code_stream.unpack_stream(packed.arrays[code_stream.NAME], self.code_bits())
        nonzero, index = tile_positions(packed.arrays["bits"], packed.arrays["offsets"])
        codes = np.where(nonzero, stream[np.minimum(index, stream.size - 1)], np.uint8(0))
        return decode_codes(untiled(codes, m, k), packed.arrays["scales"], self.ebits, self.mbits)

    def stored_bytes(self, m: int, k: int) -> int:
        """The bytes at the break-even density (those of dense FPx): the real count is the packed weight's."""
        return self.fpx.stored_bytes(m, k)

    def sparse_bytes(self, m: int, k: int, row_nonzeros: np.ndarray) -> int:
        tm, tk = tile_grid(m, k)
        stream = stream_length(int(row_nonzeros.sum())) * self.code_bits() // 8
        return stream + tm * tk * (WORDS_PER_TILE + 1) * 4 + 2 * m

    def code_bits(self) -> int:
        return self.fpx.code_bits()

    def decode_stage(self) -> BitmapFPxDecode:
        return BitmapFPxDecode(self.name, fpx_decode_stage(self.ebits, self.mbits))


def tile_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bits, offsets, the nonzero codes uint8 [nnz] in stream order) of eXmY codes uint8 [M, K]."""
    tiles = tiled(codes)  # [TM, TK, 1024]
    nonzero = tiles != 0
    bits, offsets = tile_bits(nonzero)
    return bits, offsets, tiles[nonzero]  # tile-major, row-major in a tile


class BitmapFPxDecode(DecodeStage):
    """W[m, k] = (bit set ? value(code of its rank in the stream) : 0) * scales[m].

    Capabilities: row scale (the scale after the sum over k, as FPx) and runs along K (`decode_run`: a
    rank per chunk of a run, the chunk's codes read as one window). Stored order: bits, offsets, codes,
    scales."""

    scales_rows = True
    chunk = 4  # weights a window serves: 32 // b codes are whole in it, b <= 8 (chunks of 8 spilled)

    def __init__(self, name: str, values: FPxDecode):
        self.name = name
        self.values = values
        self.k_runs = KRuns(RUN_LENGTHS, self.decode_run)
        self.tile_scatter = bit_scatter(self.code_value, self.scatter_chunk, self.chunk_values, redirect_missing=True)

    @property
    def scatter_chunk(self) -> int:
        """Set bits a trip of the tile scatter: as many codes as one window holds whole, at most SCATTER_CHUNK
        (benchmarks/results/gemm_sass_sm_90a_sparse.md)."""
        return min(SCATTER_CHUNK, WORD_BITS // self.values.bits)

    def chunk_values(self, stored, index, count: int, bind):
        """The unscaled values of the stream's codes index .. index + count - 1 (the tile scatter's
        chunk): one window from `index` (a running code offset: code j is j·b bits up), decoded in pairs
        (SWAR, as `decode_run`)."""
        from tvm import tirx

        width = self.values.bits
        assert count * width <= WORD_BITS, (count, width)
        window = bind("window", self.window(stored[2], index))
        low16, sixteen = tirx.const(0xFFFF, "uint32"), tirx.const(16, "uint32")

        def code(j: int):
            return window >> tirx.const(j * width, "uint32") if j else window

        def fp16(h):
            return tirx.reinterpret("float16", h.astype("uint16"))

        values = []
        for j in range(0, count, 2):
            if j + 1 == count:
                values.append(fp16(self.values.code_fp16_bits(code(j)) & low16))
                continue
            h = bind(f"pair{j}", self.values.code_fp16_bits((code(j) & low16) | (code(j + 1) << sixteen), pair=True))
            values += [fp16(h & low16), fp16(h >> sixteen)]
        return values

    def code_value(self, stored, index):
        """float16 TIR: the unscaled value of the stream's code `index` (the tile scatter's value)."""
        from tvm import tirx

        h = self.values.code_fp16_bits(self.window(stored[2], index))  # the window's lowest code
        return tirx.reinterpret("float16", h.astype("uint16"))

    def unscaled_decode(self, stored, row, col, dtype: str):
        from tvm import tirx

        bits, offsets, codes = stored[:-1]
        is_set, index = tile_rank(bits, offsets, row, col)
        h = self.values.code_fp16_bits(self.window(codes, index))  # the window's lowest code
        return tirx.Select(is_set, tirx.reinterpret("float16", h.astype("uint16")), tirx.const(0, "float16")).astype(
            dtype
        )

    def decode_run(self, stored, row, col0, length: int, dtype: str, bind):
        """The run's unscaled values, chunk by chunk (`chunk` weights): the chunk's rank (the run's, plus
        the set bits of the chunks before), the window of codes from it (`code_stream.window`), then per
        pair of weights the fp16 patterns of the window's lowest codes (SWAR), masked by their bits, the
        window advanced by one code past each set bit."""
        from tvm import tirx

        bits, offsets, codes = stored[:-1]
        width = self.values.bits
        rank, words = run_start(bits, offsets, row, col0, length, bind)
        one, sixteen, low16 = (tirx.const(v, "uint32") for v in (1, 16, 0xFFFF))
        values, mask = [], None
        for c in range(length // self.chunk):
            first = c * self.chunk
            shifted = words[first // WORD_BITS] >> tirx.const(first % WORD_BITS, "uint32")
            if mask is not None:
                rank = bind(f"chunk_rank{c}", self.chunk_rank(rank, mask))
            mask = bind(f"chunk_mask{c}", shifted & tirx.const((1 << self.chunk) - 1, "uint32"))
            window = bind(f"window{c}_0", self.window(codes, rank))
            for j in range(0, self.chunk, 2):  # a pair of weights: one half2 of patterns
                pair_bits = [(mask >> tirx.const(j + i, "uint32")) & one for i in range(2)]
                second = bind(f"window{c}_{j + 1}", window >> (pair_bits[0] * tirx.const(width, "uint32")))
                kept = (pair_bits[0] | (pair_bits[1] << sixteen)) * low16
                h = self.values.code_fp16_bits((window & low16) | (second << sixteen), pair=True) & kept
                for half in (h & low16, h >> sixteen):
                    values.append(tirx.reinterpret("float16", half.astype("uint16")).astype(dtype))
                if j + 2 < self.chunk:
                    window = bind(f"window{c}_{j + 2}", second >> (pair_bits[1] * tirx.const(width, "uint32")))
        return values

    def chunk_rank(self, rank, mask):
        """The rank of a chunk from the previous chunk's rank and mask."""
        from tvm import tirx

        return rank + tirx.popcount(mask).astype("int32")

    def window(self, codes, rank):
        """The stream's codes rank, rank + 1, ... (`code_stream.window`)."""
        return code_stream.window(codes, self.values.bits, rank)

    def row_scale(self, stored, row):
        return self.values.row_scale(stored, row)  # scales are the last buffer, as FPx's

    def decode(self, stored, row, col, dtype: str):
        return self.values.scaled(self.unscaled_decode(stored, row, col, "float16"), stored[-1][row], dtype)


def bitmap_fpx_formats() -> dict[str, WeightFormat]:
    """The registry's sparse x FPx entries: "bitmap-eXmY" for every eXmY FPx registers."""
    canonical = [f for name, f in fpx_formats().items() if isinstance(f, FPxFormat) and name == f.stage_name]
    return {
        f"{LAYOUT}-{f.stage_name}": BitmapFPxFormat(f"{LAYOUT}-{f.stage_name}", f.ebits, f.mbits) for f in canonical
    }
