"""What a decode stage may tell the Tensor Core template beyond `DecodeStage` (optional).

A plain `DecodeStage` works as is: its decode expression runs inside the W-tile fetch and reads
global memory directly (for dense weights that fetch is a straight copy, so it becomes cp.async).
A packed format (FPx bit planes, sparse tiles) mixes in `StagedDecode` to have its packed words
travel compressed: the template copies those stored buffers tile by tile into shared memory with
cp.async (as many pipeline stages deep as the config says) and runs the decode from there into the
fp16 W tile that ldmatrix reads.

    class FP6Decode(DecodeStage, StagedDecode):
        def shared_staged_buffers(self, m, k):
            return ["planes"]          # per-row scales stay in global memory (tiny, cached)

Staged buffers must be indexed by (row, an affine function of col) so the tile of each one is a
rectangle (e.g. planes[row, col // 16 * 3 + j]); a 16-byte row of it must not straddle two K tiles.
"""

from __future__ import annotations

from tensorpress.schedules.weight_gemm import DecodeStage


class StagedDecode:
    """Mixin for decode stages whose stored tiles should be staged in shared memory with cp.async."""

    def shared_staged_buffers(self, m: int, k: int) -> list[str]:
        """Names (as in `stored_buffers`) of the buffers to stage; the rest are read from global."""
        return []


def staged_buffer_names(stage: DecodeStage, m: int, k: int) -> list[str]:
    """The stored buffers `stage` wants staged in shared memory (none for a plain DecodeStage)."""
    names = stage.shared_staged_buffers(m, k) if isinstance(stage, StagedDecode) else []
    known = [b.name for b in stage.stored_buffers(m, k)]
    for name in names:
        if name not in known:
            raise ValueError(f"decode stage {stage.name!r} stages {name!r}, which it does not store ({known})")
    return list(names)
