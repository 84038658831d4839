"""Dense weights pre-packed for the CPU micro-kernel: W stored as column panels of 16 rows of M.

    stored "weight": [M/16, K, 16]            W[m, k] = weight[m // 16, k, m % 16]

    W [M, K]                          weight[p] = W[16p : 16p+16, :] transposed, K rows of 16
    m 0..15   ─ panel 0 ─►            panel 0:  k=0: W[0,0]  W[1,0] ... W[15,0]
    m 16..31  ─ panel 1 ─►                      k=1: W[0,1]  W[1,1] ... W[15,1]
    ...                                         ...

The CPU weight GEMM loads 16 consecutive values of one k row per step (two AVX2 vectors, one
AVX-512 vector), so with this layout it reads the weight in place, with no per-call repacking;
with the plain [M, K] layout ("dense-fp32") it transposes each 16-row panel on every call, which
costs about a third of the GEMM at 32 tokens. The packer is numpy
`w.reshape(M // 16, 16, K).transpose(0, 2, 1)` (`compiler/formats/dense_panel.py`).
"""

from __future__ import annotations

from tvm import te, tirx

from tensorpress.compiler.formats.dense_panel import PANEL_WIDTH
from tensorpress.schedules.weight_gemm import DecodeStage, StoredBuffer, register_decode_stage


class DensePanelDecode(DecodeStage):
    """W[m, k] = weight[m // 16, k, m % 16], stored in `dtype` and cast to the compute dtype."""

    cpu_panel_width = PANEL_WIDTH

    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = dtype

    def stored_buffers(self, m: int, k: int) -> list[StoredBuffer]:
        return [StoredBuffer("weight", (m // PANEL_WIDTH, k, PANEL_WIDTH), self.dtype)]

    def decode(self, stored: list[te.Tensor], row: tirx.PrimExpr, col: tirx.PrimExpr, dtype: str):
        value = stored[0][row // PANEL_WIDTH, col, row % PANEL_WIDTH]
        return value if self.dtype == dtype else value.astype(dtype)

    def unsupported_reason(self, m: int, k: int) -> str | None:
        if m % PANEL_WIDTH:
            return f"M must be a multiple of {PANEL_WIDTH}"
        return None


DENSE_FP32_PANEL = register_decode_stage(DensePanelDecode("dense-fp32-panel", "float32"))
DENSE_FP16_PANEL = register_decode_stage(DensePanelDecode("dense-fp16-panel", "float16"))
