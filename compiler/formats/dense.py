"""Dense weights: W stored as it is, an [M, K] matrix in fp16 or fp32 (the identity decode).

    stored "weight": [M, K]                    W[m, k] = weight[m, k]

On CUDA this is the Tensor Core GEMM's fp16 operand, copied tile by tile with cp.async; an fp16 model's
weight is read in place (the artifact does not store it twice). The CPU keeps dense weights as column
panels instead (`dense_column_panels.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tensorpress.compiler.formats.base import PackedWeight, WeightFormat, check_weight
from tensorpress.schedules.decode_stage import DecodeStage, StoredBuffer


@dataclass(frozen=True)
class DenseFormat(WeightFormat):
    """W stored as is, in `dtype` (identity for float32, a rounding to nearest for float16)."""

    name: str
    dtype: str
    compresses: ClassVar[bool] = False

    def pack(self, w: np.ndarray) -> PackedWeight:
        w = check_weight(w)
        return PackedWeight(self.name, w.shape, {"weight": w.astype(self.dtype)})

    def unpack(self, packed: PackedWeight) -> np.ndarray:
        return packed.arrays["weight"].astype(np.float32)

    def stored_bytes(self, m: int, k: int) -> int:
        return m * k * np.dtype(self.dtype).itemsize

    def code_bits(self) -> int:
        return 8 * np.dtype(self.dtype).itemsize

    def decode_stage(self) -> DenseDecode:
        return DenseDecode(self.name, self.dtype)


class DenseDecode(DecodeStage):
    """W[m, k] = weight[m, k], stored in `dtype` and cast to the compute dtype."""

    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = dtype

    def stored_buffers(self, m: int, k: int) -> list[StoredBuffer]:
        return [StoredBuffer("weight", (m, k), self.dtype)]

    def decode(self, stored, row, col, dtype: str):
        value = stored[0][row, col]
        return value if self.dtype == dtype else value.astype(dtype)
