"""What a decode stage may tell the Tensor Core template beyond `DecodeStage` (all optional).

A plain `DecodeStage` works as is: its decode expression runs inside the W-tile fetch and reads
global memory directly (for dense weights that fetch is a straight copy, so it becomes cp.async).
Three mixins let a packed format do better, each building on the one before:

`StagedDecode`: the packed words travel compressed. The template copies the named stored buffers
tile by tile into shared memory with cp.async (as many pipeline stages deep as the config says) and
runs the decode from there into the fp16 W tile that ldmatrix reads.

    class FP6Decode(DecodeStage, StagedDecode):
        def shared_staged_buffers(self, m, k):
            return ["planes"]          # per-row scales stay in global memory (tiny, cached)

Staged buffers must be indexed by (row, an affine function of col) so the tile of each one is a
rectangle (e.g. planes[row, col // 16 * 3 + j]); a 16-byte row of it must not straddle two K tiles.

`RowScaledDecode`: W[m, k] = unscaled(m, k) · row_scale(m). `make_weight_gemm` then decodes the
unscaled values and multiplies column m of Y by row_scale(m) once, after the sum over k, instead of
every weight before it (one fp32 multiply per output instead of one per weight).

`FragmentDecode`: the stage also decodes straight into the registers of an mma.m16n8k16 B fragment,
two weights per 32-bit register, from the staged words in shared memory. The template then has no
fp16 W tile and no ldmatrix for W (`schedules/tensorcore/fragment_decode.py`):

    global ──cp.async──▶ staged words (shared) ──fragment_pair (LDS + integer ops)──▶ B registers ──▶ mma

The template asks for (row, col), (row, col + 1) pairs, col even, in whatever order the B fragment
layout gives each lane; the stage never hears of lanes. Its answer must equal the PrimFunc's decode
block (the unscaled values, for a RowScaledDecode stage whose PrimFunc scales in the epilogue), and
must be finite for every possible content of the staged words: beyond K the template zero-fills X,
not W, and 0 · finite = 0.
"""

from __future__ import annotations

from tvm import tirx

from tensorpress.schedules.weight_gemm import DecodeStage


class StagedDecode:
    """Mixin for decode stages whose stored tiles should be staged in shared memory with cp.async."""

    def shared_staged_buffers(self, m: int, k: int) -> list[str]:
        """Names (as in `stored_buffers`) of the buffers to stage; the rest are read from global."""
        return []


class RowScaledDecode:
    """Mixin for decode stages whose W is a per-row factor times an unscaled value.

    `make_weight_gemm` looks these two methods up (by name) to put the factor in the epilogue.
    The stage's `decode` must stay the product of the two (it is what the unfactored PrimFunc uses).
    """

    def unscaled_decode(self, stored: list, row: tirx.PrimExpr, col: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
        """TIR expression for W[row, col] / row_scale(row) in `dtype` (exact: no rounding)."""
        raise NotImplementedError

    def row_scale(self, stored: list, row: tirx.PrimExpr) -> tirx.PrimExpr:
        """float32 TIR expression: the factor of weight row `row`, exactly representable in fp32."""
        raise NotImplementedError


class FragmentDecode(StagedDecode):
    """Mixin for staged stages that decode two weights at a time straight into mma B registers."""

    fragment_k: int = 32  # k columns of one decode unit (16 rows x fragment_k); a multiple of 16

    def fragment_pair(self, staged: list, row: tirx.PrimExpr, col: tirx.PrimExpr) -> tirx.PrimExpr:
        """uint32 TIR expression: the fp16 bit patterns of W[row, col] (bits 0..15) and W[row, col + 1]
        (bits 16..31), col even, reading only `staged` (the `shared_staged_buffers`, in that order,
        indexed as the stored buffers are). The values are those of the PrimFunc's decode block."""
        raise NotImplementedError


def staged_buffer_names(stage: DecodeStage, m: int, k: int) -> list[str]:
    """The stored buffers `stage` wants staged in shared memory (none for a plain DecodeStage)."""
    names = stage.shared_staged_buffers(m, k) if isinstance(stage, StagedDecode) else []
    known = [b.name for b in stage.stored_buffers(m, k)]
    for name in names:
        if name not in known:
            raise ValueError(f"decode stage {stage.name!r} stages {name!r}, which it does not store ({known})")
    return list(names)
