"""Dense weights pre-packed for the CPU micro-kernel: W stored as column panels of 16 rows of M.

    stored "weight": [ceil(M/16), K, 16]      W[m, k] = weight[m // 16, k, m % 16]
                                              (rows past M in the last panel are zeros)

    W [M, K]                          weight[p] = W[16p : 16p+16, :] transposed, K rows of 16
    m 0..15   ─ panel 0 ─►            panel 0:  k=0: W[0,0]  W[1,0] ... W[15,0]
    m 16..31  ─ panel 1 ─►                      k=1: W[0,1]  W[1,1] ... W[15,1]
    ...                                         ...

The CPU weight GEMM loads 16 consecutive values of one k row per step (two AVX2 vectors, one AVX-512
vector), so with this layout it reads the weight in place (`cpu_panel_width`); with the plain [M, K]
layout ("dense-fp32") it transposes each panel on every call: 20-30 % of the GEMM at small batches,
about 2x at N = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tensorpress.compiler.formats.base import PackedWeight, WeightFormat, check_weight
from tensorpress.schedules.decode_stage import DecodeStage, StoredBuffer

PANEL_WIDTH = 16


def panel_count(m: int) -> int:
    return -(-m // PANEL_WIDTH)


def pack_dense_panel(w: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """The stored array for W [M, K]: [ceil(M/16), K, 16] in `dtype`, the last panel zero padded
    (a classifier's 1000 classes: the GEMM pads its last column tile anyway, see register_blocked_gemm)."""
    m, k = w.shape
    padded = np.zeros((panel_count(m) * PANEL_WIDTH, k), dtype)
    padded[:m] = w
    panels = padded.reshape(-1, PANEL_WIDTH, k).transpose(0, 2, 1)
    return np.ascontiguousarray(panels)


def unpack_dense_panel(panels: np.ndarray, m: int | None = None) -> np.ndarray:
    """W [M, K] float32 back from its panels (the exact inverse of `pack_dense_panel`); `m` trims the
    padding of the last panel (default: none)."""
    p, k, width = panels.shape
    w = panels.transpose(0, 2, 1).reshape(p * width, k)[: p * width if m is None else m]
    return np.ascontiguousarray(w.astype(np.float32))


@dataclass(frozen=True)
class DensePanelFormat(WeightFormat):
    """W in `dtype`, stored as [M/16, K, 16] column panels (see the module docstring)."""

    name: str
    dtype: str
    compresses: ClassVar[bool] = False

    def pack(self, w: np.ndarray) -> PackedWeight:
        w = check_weight(w)
        return PackedWeight(self.name, w.shape, {"weight": pack_dense_panel(w, self.dtype)})

    def unpack(self, packed: PackedWeight) -> np.ndarray:
        return unpack_dense_panel(packed.arrays["weight"], packed.shape[0])

    def stored_bytes(self, m: int, k: int) -> int:
        return panel_count(m) * PANEL_WIDTH * k * np.dtype(self.dtype).itemsize

    def code_bits(self) -> int:
        return 8 * np.dtype(self.dtype).itemsize

    def decode_stage(self) -> DensePanelDecode:
        return DensePanelDecode(self.name, self.dtype)


class DensePanelDecode(DecodeStage):
    """W[m, k] = weight[m // 16, k, m % 16], stored in `dtype` and cast to the compute dtype."""

    cpu_panel_width = PANEL_WIDTH

    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = dtype

    def stored_buffers(self, m: int, k: int) -> list[StoredBuffer]:
        return [StoredBuffer("weight", (panel_count(m), k, PANEL_WIDTH), self.dtype)]

    def decode(self, stored, row, col, dtype: str):
        value = stored[0][row // PANEL_WIDTH, col, row % PANEL_WIDTH]
        return value if self.dtype == dtype else value.astype(dtype)

    def unsupported_reason(self, m: int, k: int) -> str | None:
        return None  # any M: the last panel is zero padded
