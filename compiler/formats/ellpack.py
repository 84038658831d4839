"""ellpack: unstructured-sparse weights as row slots for the CPU (ELLPACK): every output row holds the
same number S of (fp16 value, column) slots, the CPU kernel multiplies the nonzeros only.

S is the largest nonzero count of a row (at least 1); a row with fewer nonzeros fills its last slots
with value 0 and column 0 (they add 0 x X[n, 0]). Rows pruned per output row (magnitude, wanda,
sparsegpt) all have the same count, so padding costs nothing there. Rows come in blocks of 8, the
block's slots slot-major (the last block padded with all-zero rows):

    W[M, K]                        stored, block b = rows 8b .. 8b + 7
    row 8b+0: . a . . b . c        values[b, s, r]: the s-th nonzero of row 8b + r (fp16)
    row 8b+1: d . . e . . .        cols[b, s, r]:   its column
    ...                                        r = 0   1   2 ...  7
                                   slot s = 0:     a   d   .       .      <- one 8-lane vector load
                                   slot s = 1:     b   e   .       .
                                   slot s = 2:     c   0*  .       .      (* padding: value 0, col 0)

    stored "values": float16 [MB, S, 8]     MB = ceil(M / 8), in a row's column order
    stored "cols":   uint16  [MB, S, 8]     (int32 when K > 65536)
    Y[n, m] = sum over s of X[n, cols[m // 8, s, m % 8]] * values[m // 8, s, m % 8]   (+ bias[m])

Why this layout: the kernel (`schedules/cpu/row_slot_gemm.py`) works on one block of 8 rows at a
time. With few tokens it keeps the 8 rows' sums in the 8 fp32 lanes of one AVX2 register: a slot is
one 16-byte load of 8 fp16 values (one vcvtph2ps), 8 column loads and 8 gathered X, and no
horizontal sum at the end. With more tokens it reads X transposed, a slot's tokens contiguous, and
broadcasts each value over them. Either way a block's slots are one contiguous stream. fp16 values
and 16-bit columns make 4 B per nonzero: at 80% sparsity 0.8 B per weight, 2.5x fewer bytes than
fp16 and 5x fewer than fp32 (bitmap stores fewer, 0.53 B, but its decode pays for every weight,
zero or not: on a CPU this one is the format that can beat dense; on GPUs use bitmap).

The packer does not prune (pruning is `compiler/pruning.py`'s, before packing): it stores the weights
that are nonzero once rounded to fp16 (-0.0 and values that underflow fp16 are zeros and not stored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tensorpress.compiler.formats.base import PackedWeight, WeightFormat, check_weight
from tensorpress.errors import TensorpressError
from tensorpress.schedules.decode_stage import DecodeStage, RowSlots

BLOCK_ROWS = 8  # rows per block: the 8 fp32 lanes of an AVX2 register
VALUE_BYTES = 2
UINT16_COLUMNS = 1 << 16  # K up to this: 16-bit columns


def column_dtype(k: int) -> np.dtype:
    return np.dtype(np.uint16) if k <= UINT16_COLUMNS else np.dtype(np.int32)


def slot_count(row_nonzeros: np.ndarray) -> int:
    """S: the largest nonzero count of a row, at least 1 (so no stored array is empty)."""
    return max(int(row_nonzeros.max(initial=0)), 1)


@dataclass(frozen=True)
class EllpackFormat(WeightFormat):
    """Row slots in blocks of 8 rows, slot-major (see the module docstring); the CPU kernel only."""

    name: str = "ellpack"
    sparse: ClassVar[bool] = True
    targets: ClassVar[tuple[str, ...]] = ("cpu",)
    auto_targets: ClassVar[tuple[str, ...]] = ("cpu",)

    def pack(self, w: np.ndarray) -> PackedWeight:
        w = check_weight(w)
        if not np.isfinite(w).all():
            raise TensorpressError("ellpack cannot store a weight holding inf or NaN; check the model's weights.")
        m, k = w.shape
        with np.errstate(over="ignore"):
            w16 = w.astype(np.float16)
        if not np.isfinite(w16).all():
            raise TensorpressError("ellpack stores fp16 values; this weight has values beyond fp16's range.")
        nonzero = w16 != 0
        counts = nonzero.sum(axis=1)
        slots = slot_count(counts)
        blocks = -(-m // BLOCK_ROWS)
        values = np.zeros((blocks * BLOCK_ROWS, slots), np.float16)
        cols = np.zeros((blocks * BLOCK_ROWS, slots), column_dtype(k))
        rows, columns = np.nonzero(nonzero)  # row-major: each row's columns ascending
        slot = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
        values[rows, slot] = w16[rows, columns]
        cols[rows, slot] = columns
        arrays = {
            "values": values.reshape(blocks, BLOCK_ROWS, slots).transpose(0, 2, 1).copy(),
            "cols": cols.reshape(blocks, BLOCK_ROWS, slots).transpose(0, 2, 1).copy(),
        }
        return PackedWeight(self.name, (m, k), arrays)

    def unpack(self, packed: PackedWeight) -> np.ndarray:
        m, k = packed.shape
        values, cols = packed.arrays["values"], packed.arrays["cols"]
        by_row_v = values.transpose(0, 2, 1).reshape(-1, values.shape[1])[:m]  # [M, S]
        by_row_c = cols.transpose(0, 2, 1).reshape(-1, cols.shape[1])[:m].astype(np.int64)
        w = np.zeros((m, k), np.float32)
        rows = np.broadcast_to(np.arange(m)[:, None], by_row_c.shape)
        real = by_row_v != 0  # padding slots hold 0 (and stored values are never 0)
        w[rows[real], by_row_c[real]] = by_row_v[real].astype(np.float32)
        return w

    def stored_bytes(self, m: int, k: int) -> int:
        """The bytes at the break-even density (those of fp16): the real count is the packed weight's."""
        return 2 * m * k

    def sparse_bytes(self, m: int, k: int, row_nonzeros: np.ndarray) -> int:
        per_slot = VALUE_BYTES + column_dtype(k).itemsize
        return -(-m // BLOCK_ROWS) * BLOCK_ROWS * slot_count(row_nonzeros) * per_slot

    def code_bits(self) -> int:
        return 16

    def decode_stage(self) -> EllpackDecode:
        return EllpackDecode(self.name)


class EllpackDecode(DecodeStage):
    """No per-weight decode: the weight GEMM runs over the row slots (`row_slots`)."""

    def __init__(self, name: str):
        self.name = name
        self.row_slots = RowSlots(block_rows=BLOCK_ROWS, value=self._value, column=self._column)

    def unsupported_reason(self, m: int, k: int) -> str | None:
        return None  # any shape: the CPU kernel pads rows to blocks and takes any K

    @staticmethod
    def _value(stored, row, slot):
        values, _ = stored
        return values[row // BLOCK_ROWS, slot, row % BLOCK_ROWS]

    @staticmethod
    def _column(stored, row, slot):
        _, cols = stored
        return cols[row // BLOCK_ROWS, slot, row % BLOCK_ROWS].astype("int32")
