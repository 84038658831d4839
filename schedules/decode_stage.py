"""The decode stage: what a weight format tells the weight-GEMM schedules, in one interface.

A weight format (`compiler/formats/<name>.py`) stores W[M, K] in its own buffers and gives the TIR
expression of W[m, k] from them: that expression is its decode stage, the one definition of its
decode math. `make_weight_gemm` (`weight_gemm.py`) builds the GEMM around it, and every schedule
(the Tensor Core template, the CPU rules) asks the stage what more it can do. A plain stage with
`decode` alone works everywhere; each capability below is optional, off by default, and the schedules
never ask a stage for its name:

    capability           declared by                          used by
    row scale            row_scale + unscaled_decode          make_weight_gemm: the factor moves to
                                                              the epilogue (one multiply per output)
    shared staging       staged_buffers(m, k)                 Tensor Core template: cp.async of the
                                                              packed tiles, decode from shared memory
    fragment decode      fragment_k + fragment_pair           Tensor Core template: staged words
                         (+ fragment_decode_preferred)        decoded straight into mma B registers
    stored panels        cpu_panel_width                      CPU GEMM: W read in place, no decode
    word-order decode    cpu_decode_order                     CPU GEMM at few tokens: 8 codes per
                                                              vector instruction along K
    row slots            row_slots                            make_weight_gemm: the GEMM over the
                                                              nonzeros (no decode block); CPU only
    tile scatter         tile_scatter                         Tensor Core template: zero-filled W
                                                              tile, each stored word's value stored
                                                              at its position (scatter formats), or
                                                              each set bit's value (bitmap words);
                                                              preferred to runs along K
    runs along K         k_runs                               Tensor Core template: each thread
                                                              decodes a run of consecutive weights
                                                              of a W-tile row, sharing its work

Row slots. A sparse stage may describe W as S slots per row, each a (value, column) pair, padding
slots value 0: W[m, k] = the sum of value(m, s) over the slots s with column(m, s) == k. Then the
weight GEMM is defined over the slots (`make_weight_gemm`, "Row slots" there), Y[n, m] = sum over s of
X[n, column(m, s)] * value(m, s), and the CPU schedule (`schedules/cpu/row_slot_gemm.py`) runs it.
Such a stage needs no `decode`; its format's kernels are CPU-only (`WeightFormat.targets`).

Shared staging. The template copies the named stored buffers tile by tile into shared memory with
cp.async (as many pipeline stages deep as its config says) and runs the decode from there. A staged
buffer must be indexed by (row, an affine function of col), so the tile of each one is a rectangle,
and a 16-byte row of it must not straddle two K tiles.

Fragment decode. The stage decodes two weights at a time straight into the registers of an
mma.m16n8k16 B fragment, from the staged words (`schedules/tensorcore/fragment_decode.py`):

    global ──cp.async──▶ staged words (shared) ──fragment_pair (LDS + integer ops)──▶ B registers ──▶ mma

The template asks for (row, col), (row, col + 1) pairs, col even, in whatever order the B fragment
layout gives each lane; the stage never hears of lanes. Its answer must equal the PrimFunc's decode
block (the unscaled values, when the PrimFunc scales rows in the epilogue), and must be finite for
every possible content of the staged words: beyond K the template zero-fills X, not W (a stage that
reads global memory at an index it decodes must keep that index in bounds there too). What a unit's
pairs share (bitmap: a row's rank, its two words) goes through `bind`. What a pair's rank needs of the
rows above it (bitmap: their set bits) the stage need not count in every lane: with
`fragment_counts_rows` it counts its own row (`fragment_row_count`, each lane its two rows) and the
template hands each pair `rows_above`, the sum over the unit's rows above, by a scan across the warp's
lanes (`fragment_decode.py`: three shuffles up, one broadcast). A stage that also
offers a tile scatter says per weight which of the two the template takes (`fragment_decode_preferred`;
bitmap above 33 % density: fragment decode costs the same at any density, the scatter follows the nonzeros).

Tile scatter. A sparse stage whose stored words each say where in a tile their value goes (Tiled-CSL)
is a scatter, not a per-element gather: its `decode` still defines W[m, k] (a search, the CPU's path
and the one definition the tests check), and `tile_scatter` tells the Tensor Core template how to
build the tile without it. W is cut in tiles of tile_rows x tile_cols; tile (tr, tc) is all zeros
except that, for every word index j in word_range(stored, tr, tc) = [first, end), with w the word at
j of the stored buffer `words` (an index into the stored buffers),
    element(w) = (row r, column c in the tile, value) says W[tr·tile_rows + r, tc·tile_cols + c] = value.
first and end are multiples of `vector` (whole 128-bit loads); a tile may hold the same word twice
(its padding), and a position no word names is 0. `schedules/tile_scatter.py` has the picture.

Bitmap words (`set_bits`, e.g. bitmap: its bit words, bitmap x FPx too): the tile's words are
[first, end) = its tile_rows x tile_cols / 32 words in position order, bit b of its word i set when
position p = 32 i + b (row p // tile_cols, column p % tile_cols) holds an element; the elements' values
are stored in position order from index first_index(stored, tr, tc), so the element at p has index
first_index + the set bits of the tile before p, and value(stored, index). The scatter loops over the
set bits only (lowest first, cleared one by one): its cost follows the nonzeros, not the weights. It
takes them `chunk` at a time (one loop trip: fewer trips for the warp's busiest lane, the loop's
counter and branch once a chunk), the chunk's values from `values(stored, index, count, bind)` when the
stage has it: the `count` values of indices index .. index + count - 1, sharing work through `bind` as a
run along K does (bitmap x FPx: one window of the code stream for the chunk's codes, decoded in pairs);
a value past the last set bit may be garbage (it is not stored) but must read in bounds. A
stage may declare a scatter and also a per-element `decode` (bitmap's rank, the CPU's path): then
`make_weight_gemm` defines W by the decode (`decodes_elements`), and the Tensor Core template builds its
W tiles by the scatter, which must give the same values (the unscaled ones when the epilogue applies a
row scale: the template takes the scatter of a scaling stage only then).

Runs along K. A stage whose decode of W[m, k] repeats work that its neighbours along K share (a
sparse rank: the popcounts of the words before a row, the row's own words, the tile offset) may decode
a run of `length` consecutive weights W[row, col0 .. col0 + length) at once, col0 a multiple of
`length`: `k_runs.decode(stored, row, col0, length, dtype, bind)` gives the `length` values. What the
run shares goes through `bind(name, value)`, which computes the value once, in order, and returns what
reads it (a register of the template's): each bound value may use the ones bound before it, so a rank
advances by one bit a weight without the expression of every rank growing with the run. The Tensor
Core template then gives each thread whole runs of its decoded W tile instead of one weight at a time
(`schedules/tensorcore/run_tile.py` has the picture). It asks only for runs with col0 < K (the stage
may read its padding up to the next multiple of `length`) and masks columns >= K itself; the values
must equal the PrimFunc's decode block (the unscaled values when the epilogue applies a row scale).

Buffers. What a format stores for one weight is described by its packed weight (`StoredBuffer`s,
possibly sized by the data, e.g. a sparse weight's nonzero count); `stored_buffers(m, k)` answers for
formats whose buffers follow from the shape alone, so kernels can be built without packing a weight.

This module imports no TVM, so the format files (which subclass `DecodeStage`) import without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tvm import te, tirx

MMA_MULTIPLE = 16  # the Tensor Core GEMM's mma.m16n8k16 tiles need M and K in multiples of this


@dataclass(frozen=True)
class StoredBuffer:
    """One array a weight format stores for a [M, K] weight (shape and dtype as in the artifact)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class CPUDecodeOrder:
    """How a stage reads a row word by word (`schedules/cpu/decode_along_k.py`).

    position(col): a permutation of each group of `group` columns (its own inverse) under which every
    run of `run` consecutive positions comes from one stored word per buffer.
    """

    position: Callable[[Any], Any]
    group: int
    run: int


@dataclass(frozen=True)
class RowSlots:
    """A stage's W as row slots (see the module docstring): value(stored, row, slot) and
    column(stored, row, slot) are TIR expressions (any float dtype; int32); the slot count is the size
    of axis 1 of the first stored buffer, and rows come in blocks of `block_rows`, one slot of a block's
    rows contiguous (the CPU schedule vectorises over them)."""

    block_rows: int
    value: Callable[[list, Any, Any], Any]
    column: Callable[[list, Any, Any], Any]


@dataclass(frozen=True)
class KRuns:
    """A stage's decode of runs of consecutive weights along K (see the module docstring, "Runs along K"):
    decode(stored, row, col0, length, dtype, bind) -> values [PrimExpr] * length for any length in
    `lengths` (longest first, each a multiple of 8: one 16-byte store of fp16); bind(name, PrimExpr) ->
    PrimExpr computes a value the run shares once."""

    lengths: tuple[int, ...]
    decode: Callable[[list, Any, Any, int, str, Callable[[str, Any], Any]], list]


@dataclass(frozen=True)
class SetBits:
    """The words of a tile scatter that are bitmaps (see the module docstring, "Tile scatter"):
    first_index(stored, tile_row, tile_col) -> int32 TIR index of the tile's first element's value;
    value(stored, index) -> float TIR value of the element of that index; `chunk` set bits a loop trip,
    their values by values(stored, index, count, bind) -> [count float TIR values] when given (else by
    `value` each; see the module docstring, "Tile scatter": values past the last set bit read in bounds);
    `redirect_missing`: a trip's stores past the word's last set bit go to the trip's first bit's
    position (a select, overwritten by that bit's store) instead of being skipped (a condition each: nvcc
    branches around a store whose value is computed, but predicates a load and a store)."""

    first_index: Callable[[list, Any, Any], Any]
    value: Callable[[list, Any], Any]
    chunk: int = 1
    values: Callable[[list, Any, int, Callable[[str, Any], Any]], list] | None = None
    redirect_missing: bool = False  # a chunk's missing bits stored at its first bit's position, not skipped


@dataclass(frozen=True)
class TileScatter:
    """A stage's W as words scattered into zero tiles (see the module docstring, "Tile scatter"):
    word_range(stored, tile_row, tile_col) -> (first, end) int32 TIR word indices (into the `words`
    stored buffer read as flat, row-major); then either element(word) -> (row, col, value) TIR (int32,
    int32, float16) of one word (a word per element), or `set_bits` (a bitmap word per 32 positions)."""

    tile_rows: int
    tile_cols: int
    words: int
    word_range: Callable[[list, Any, Any], tuple[Any, Any]]
    element: Callable[[Any], tuple[Any, Any, Any]] | None = None
    vector: int = 4  # words per aligned 128-bit load
    set_bits: SetBits | None = None


class DecodeStage:
    """How a weight format turns its stored buffers into W[m, k], written once in TIR (see module docstring).

    Required: `name` (the format name the PrimFunc and its kernel carry) and `decode`; `stored_buffers`
    for formats whose buffers follow from the shape. Every other member is an optional capability.
    """

    name: str

    # -- required --------------------------------------------------------------------------------

    def decode(self, stored: list[te.Tensor], row: tirx.PrimExpr, col: tirx.PrimExpr, dtype: str) -> Any:
        """TIR expression for W[row, col] in `dtype`, reading only `stored` (the stored buffers, in order)."""
        raise NotImplementedError

    def stored_buffers(self, m: int, k: int) -> list[StoredBuffer]:
        """The buffers stored for an [m, k] weight, in the order the kernel takes them. Formats whose
        buffer sizes depend on the data leave this out: their kernels take the packed weight's buffers."""
        raise NotImplementedError(f"the buffers of a {self.name} weight depend on its data; pass the packed ones")

    def unsupported_reason(self, m: int, k: int) -> str | None:
        """None when the Tensor Core GEMM takes an [m, k] weight, else the constraint it breaks (one phrase)."""
        if m % MMA_MULTIPLE or k % MMA_MULTIPLE:
            return f"M and K must be multiples of {MMA_MULTIPLE}"
        return None

    # -- row scale -------------------------------------------------------------------------------

    scales_rows: bool = False  # True: decode(m, k) == unscaled_decode(m, k) * row_scale(m)

    def unscaled_decode(self, stored: list, row: tirx.PrimExpr, col: tirx.PrimExpr, dtype: str) -> Any:
        """TIR expression for W[row, col] / row_scale(row) in `dtype` (exact: no rounding)."""
        raise NotImplementedError

    def row_scale(self, stored: list, row: tirx.PrimExpr) -> Any:
        """float32 TIR expression: the factor of weight row `row`, exactly representable in fp32."""
        raise NotImplementedError

    # -- Tensor Core template: shared staging and fragment decode -----------------------------------

    def staged_buffers(self, m: int, k: int) -> list[str]:
        """Names (as stored) of the buffers to stage in shared memory; the rest are read from global."""
        return []

    fragment_k: int | None = None  # k columns of one fragment-decode unit (a multiple of 16), or None

    def fragment_pair(self, stored: list, row: tirx.PrimExpr, col: tirx.PrimExpr, bind=None, rows_above=None) -> Any:
        """uint32 TIR expression: the fp16 bit patterns of W[row, col] (bits 0..15) and W[row, col + 1]
        (bits 16..31), col even, reading `stored` (the stored buffers in order, each staged one
        replaced by its shared copy, indexed as the stored buffer is). The values are those of the
        PrimFunc's decode block. `bind(name, value)`, when given, computes a value once a unit for all
        its pairs (as a run along K's `bind`; equal values bound by different pairs are one register).
        `rows_above` (int32 TIR; a stage with `fragment_counts_rows`): the sum of `fragment_row_count`
        over the unit's rows above `row`, which the template gives (a scan across the warp's lanes)."""
        raise NotImplementedError

    fragment_counts_rows: bool = False  # True: fragment_pair takes rows_above from fragment_row_count

    def fragment_row_count(self, stored: list, row: tirx.PrimExpr, col0: tirx.PrimExpr, bind) -> Any:
        """int32 TIR: what row `row` of the fragment-decode unit whose first column is col0 adds to
        the rows below it (bitmap: its set bits); under 2^12, so a unit's 16 sums fit 16 bits."""
        raise NotImplementedError

    def fragment_decode_preferred(self, stored: list, m: int, k: int) -> bool:
        """For a stage offering fragment decode and a tile scatter: whether the template takes fragment
        decode for this weight (`stored`: its stored buffers, sized by the packed weight)."""
        return True

    # -- CPU schedules ----------------------------------------------------------------------------

    cpu_panel_width: int | None = None  # W stored as [M/P, K, P] column panels: read in place
    cpu_decode_order: CPUDecodeOrder | None = None  # rows readable word by word (decode along K)
    row_slots: RowSlots | None = None  # W as (value, column) slots per row: the GEMM over the nonzeros

    # -- Tensor Core template: tile scatter -------------------------------------------------------

    tile_scatter: TileScatter | None = None  # W as words scattered into zero tiles (scatter formats)
    decodes_elements: bool = True  # False: no per-element `decode`; W is defined by the tile scatter

    # -- Tensor Core template: runs along K -------------------------------------------------------

    k_runs: KRuns | None = None  # runs of consecutive weights along K decoded at once (shared work)


def staged_buffer_names(stage: DecodeStage, m: int, k: int, known: list[str]) -> list[str]:
    """The stored buffers `stage` wants staged in shared memory, checked against the `known` names."""
    names = stage.staged_buffers(m, k)
    for name in names:
        if name not in known:
            raise ValueError(f"decode stage {stage.name!r} stages {name!r}, which it does not store ({known})")
    return list(names)
