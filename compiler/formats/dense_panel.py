"""Dense weights pre-packed for the CPU weight GEMM: W stored as column panels of 16 rows of M.

    stored "weight": [M/16, K, 16]            W[m, k] = weight[m // 16, k, m % 16]

    W [M, K]                          weight[p] = W[16p : 16p+16, :] transposed, K rows of 16
    m 0..15   ─ panel 0 ─►            panel 0:  k=0: W[0,0]  W[1,0] ... W[15,0]
    m 16..31  ─ panel 1 ─►                      k=1: W[0,1]  W[1,1] ... W[15,1]

The CPU micro-kernel loads 16 consecutive values of one k row per step (two AVX2 vectors, one AVX-512
vector), so it reads the weight in place; the plain [M, K] layout makes it transpose each panel on
every call (20-30 % of the GEMM at small batches, about 2x at N = 1). Pure numpy; the decode stage
that reads it is `schedules/cpu/dense_panel.py`.
"""

from __future__ import annotations

import numpy as np

PANEL_WIDTH = 16


def pack_dense_panel(w: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """The stored array for W [M, K]: [M/16, K, 16] in `dtype`."""
    m, k = w.shape
    if m % PANEL_WIDTH:
        raise ValueError(f"a dense panel weight needs M to be a multiple of {PANEL_WIDTH}, got M={m}")
    panels = w.reshape(m // PANEL_WIDTH, PANEL_WIDTH, k).transpose(0, 2, 1)
    return np.ascontiguousarray(panels.astype(dtype))


def unpack_dense_panel(panels: np.ndarray) -> np.ndarray:
    """W [M, K] float32 back from its panels (the exact inverse of `pack_dense_panel`)."""
    p, k, width = panels.shape
    return np.ascontiguousarray(panels.transpose(0, 2, 1).reshape(p * width, k).astype(np.float32))
