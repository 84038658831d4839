"""bitmap x FPx: unstructured-sparse weights whose nonzeros are FPx codes (`--weights fp6 --sparsity 0.8`).

The bitmap of `bitmap.py` (16 x 64 tiles, a bit per weight, an offset per tile) says where the nonzeros
are; each nonzero is an eXmY code (`fpx_codes.py`) with FPx's fp16 scale per output row, and the codes
travel as one code stream split in bit planes (`code_stream.py`: FPx's power-of-two planes, plane4 +
plane2 for FP6, but sequential: code i's field follows code i - 1's, no lane interleave).

    W[M, K] (pruned) ──FPx encode──▶ codes uint8 [M, K] + scales fp16 [M]     (fpx.FPxFormat.encode)
    bitmap of the codes that are not +0, per 16 x 64 tile                       (bitmap.tile_bits)

    stored "bits":     uint32  [TM, TK, 32]   bit p % 32 of word p // 32 set: position p of the tile
                                              (p = 64 r + c) holds a code other than +0 (bitmap.py's picture)
    stored "offsets":  int32   [TM, TK]       index in the code stream of the tile's first nonzero
    stored "plane4",   uint32  [1, Vp p/32]   the nonzero codes, tile after tile (tm-major), row-major in
           "plane2"...                        a tile: code i's p-bit field at bit (i p) % 32 of word i p // 32
    stored "scales":   float16 [M]            FPx's per-row scale
        Vp = nnz + 33 rounded up to 32, zero codes: a spare code keeps the index of every position in
        bounds (the decode may load before it selects), a spare word the word after it (a run's window)

    tile (tm, tk) of the codes       the code stream
      r=0  . a . . b ...             ... │ a b c d e ... │ next tile's codes ...
      r=1  c . . d . ...                 ▲ offsets[tm, tk]
      ...                            plane4 word 0: │ h g f e d c b a │ (a nibble a code, lowest first)

    W[row, col] = bit(row, col) ? value(code[offsets[tm, tk] + popcount(bits before p)]) * scales[row] : 0

Bytes: FP6 stores 0.75 B per nonzero + 1/8 B per weight + 4 B per 1024 weights + 2 B per row: at 80%
sparsity 0.279 B a weight, 7.2x fewer than fp16 and 2.7x fewer than dense FP6. It stores fewer bytes than
dense FP6 below about 83% density (at 6 bits), which is what `--sparse-format auto` compares per layer.

Exactness: unpack(pack(w)) equals FPx's unpack(pack(w)) bit for bit (the same codes and scales; a code
of +0 is FPx's value +0, so leaving it out of the stream changes nothing; -0 is a stored code).

Decode stage (`BitmapFPxDecode`): bitmap's rank (`bitmap.tile_rank`) then the code's fields, placed in
an fp16 pattern by FPx's plain shifts (`FPxDecode.field_fp16_bits`), and FPx's row scale, applied once
per output in the GEMM's epilogue. On the Tensor Core template it decodes runs along K as bitmap does
(`decode_run`, the template's `k_runs`): a thread decodes a tile row's 64 weights, the rank of the rows
above popcounted once (`bitmap.run_start`); per chunk of 4 weights one rank (+ the previous chunk's
popcount) and one window per plane (`code_stream.window`: a funnel shift of two words holds the chunk's
codes in order); per pair of weights the windows' lowest fields make a half2 of patterns (SWAR), masked
by the two bits, and each window advances one field past a set bit. Only a chunk's windows are live:
an earlier try that read every code's words separately spilled (16 B on sm_90a for runs of 64, 4 B on
sm_80 for runs of 32); chunks of 8 (18.1 thread-instructions a weight at n16m128k64, 19.7 with 4)
spilled 24 B at n32m128k64 on sm_90a; keeping a window for the next chunks while it holds their codes
(plane4's 8 codes serve 2 chunks, plane2's 16 serve 4: 18.0) spilled 8 B at n16m128k64 on sm_80, and
sharing plane2's alone 32 B on sm_90a. Tiles too small for whole warps of runs decode a weight a thread
with the full rank. Not staged: the rank reads all 32 words of a tile's bitmap and the tile's codes start
at a data-dependent offset (neither is a rectangle the template's cp.async copies).
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


SPARE_CODES = 1 + WORD_BITS  # a code past the last (a rank may reach it) and a word past it in every plane


def stream_length(nonzeros: int) -> int:
    """Vp: codes in the stream for `nonzeros` nonzeros (the spare codes, rounded up to 32: whole words in
    every plane)."""
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
        and split in bit planes."""
        stream = np.zeros(stream_length(nonzeros.size), np.uint8)
        stream[: nonzeros.size] = nonzeros
        planes = code_stream.pack_planes(stream, self.code_bits())
        arrays = {"bits": bits, "offsets": offsets, **planes, "scales": scales}
        return PackedWeight(self.name, tuple(shape), arrays)

    def unpack(self, packed: PackedWeight) -> np.ndarray:
        if packed.format != self.name:
            raise TensorpressError(f"a {packed.format} weight cannot be unpacked as {self.name}.")
        m, k = packed.shape
        stream = code_stream.unpack_planes(packed.arrays, self.code_bits())
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
    rank per chunk of a run, the chunk's codes read as one window per plane). Stored order: bits,
    offsets, the planes widest first, scales."""

    scales_rows = True

    def __init__(self, name: str, values: FPxDecode):
        self.name = name
        self.values = values
        # weights whose codes one window per plane holds (4: chunks of 8 spilled 24 B at n32m128k64 on sm_90a)
        self.chunk = min(4, WORD_BITS // values.widths[0])
        self.k_runs = KRuns(RUN_LENGTHS, self.decode_run)

    def unscaled_decode(self, stored, row, col, dtype: str):
        from tvm import tirx

        bits, offsets, *planes = stored[:-1]
        is_set, index = tile_rank(bits, offsets, row, col)
        words = [plane[0, code_stream.field_word(index, w)] for plane, w in zip(planes, self.values.widths)]
        starts = [code_stream.field_bit(index, w).astype("uint32") for w in self.values.widths]
        h = tirx.reinterpret("float16", self.values.field_fp16_bits(words, starts).astype("uint16"))
        return tirx.Select(is_set, h, tirx.const(0, "float16")).astype(dtype)

    def decode_run(self, stored, row, col0, length: int, dtype: str, bind):
        """The run's unscaled values, chunk by chunk (`chunk` weights): the chunk's rank (the run's, plus
        the set bits of the chunks before), one window per plane from it (`code_stream.window`: the
        chunk's codes in order), then per weight the fp16 pattern of the windows' lowest fields, masked
        by its bit, each window advanced by one field when the bit is set."""
        from tvm import tirx

        bits, offsets, *planes = stored[:-1]
        widths = self.values.widths
        rank, words = run_start(bits, offsets, row, col0, length, bind)
        one, zero, sixteen = (tirx.const(v, "uint32") for v in (1, 0, 16))
        values, mask = [], None
        for c in range(length // self.chunk):
            first = c * self.chunk
            shifted = words[first // WORD_BITS] >> tirx.const(first % WORD_BITS, "uint32")
            if mask is not None:
                rank = bind(f"chunk_rank{c}", self.chunk_rank(rank, mask))
            mask = bind(f"chunk_mask{c}", shifted & tirx.const((1 << self.chunk) - 1, "uint32"))
            windows = [bind(f"window{c}_0_{w}", self.window(p, w, rank)) for p, w in zip(planes, widths)]
            for j in range(0, self.chunk, 2):  # a pair of weights: one half2 of patterns
                bits = [(mask >> tirx.const(j + i, "uint32")) & one for i in range(2)]
                following = [self._advanced(windows, bits[0], widths, bind, f"{c}_{j + 1}")]
                if j + 2 < self.chunk:
                    following.append(self._advanced(following[0], bits[1], widths, bind, f"{c}_{j + 2}"))
                low16 = tirx.const(0xFFFF, "uint32")
                pairs = [(a & low16) | (b << sixteen) for a, b in zip(windows, following[0])]
                kept = (bits[0] | (bits[1] << sixteen)) * low16
                h = self.values.field_fp16_bits(pairs, [zero] * len(widths), pair=True) & kept
                for half in (h & low16, h >> sixteen):
                    values.append(tirx.reinterpret("float16", half.astype("uint16")).astype(dtype))
                windows = following[-1]
        return values

    @staticmethod
    def _advanced(windows, bit, widths, bind, name: str) -> list:
        """The windows past the current code when `bit` is 1 (one field each), bound."""
        from tvm import tirx

        return [bind(f"window{name}_{w}", win >> (bit * tirx.const(w, "uint32"))) for win, w in zip(windows, widths)]

    def chunk_rank(self, rank, mask):
        """The rank of a chunk from the previous chunk's rank and mask."""
        from tvm import tirx

        return rank + tirx.popcount(mask).astype("int32")

    def window(self, plane, width: int, rank):
        """The plane's fields of codes rank, rank + 1, ... (`code_stream.window`)."""
        return code_stream.window(plane, width, rank)

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
