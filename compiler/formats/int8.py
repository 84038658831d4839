"""int8 weight-only: one int8 code per weight and one fp16 scale per output channel (torchao's
`int8_weight_only` recipe: symmetric, per-channel, codes in [-128, 127]).

    stored "codes":  int8    [M, K]      W[m, k] = codes[m, k] * scales[m]
    stored "scales": float16 [M]

    row m │ c[m,0] c[m,1] ... c[m,K-1] │ scale[m]        scale[m] = absmax(W[m, :]) / 127.5
                                                          c = clamp(round(W / scale), -128, 127)

Quantiser: as torchao, scale = absmax / ((127 - (-128)) / 2) and codes rounded to nearest, ties to even,
clamped to [-128, 127]. Unlike torchao the scale is stored in fp16 whatever the model's dtype (the
Tensor Core GEMM takes fp16 activations anyway) and the codes are chosen against that fp16 scale, so
`unpack` is exactly what the kernel computes: an int8 code (<= 8 significant bits) times an fp16 scale
(11) is exact in fp32. A row of zeros gets scale 0; a scale that would underflow fp16 gets its
smallest subnormal, one that would overflow its largest finite value (the codes then saturate).

The decode stage: W = code * scale with the scale a row factor, applied once per output after the sum
over k (the codes are exact in fp16). On the Tensor Core template the codes are staged in shared memory
with cp.async (1 byte per weight instead of 2 travel), decoded there into the fp16 W tile; on the CPU
the generic panel schedule decodes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tensorpress.compiler.formats.base import PackedWeight, WeightFormat, check_weight, round_scales_to_fp16
from tensorpress.errors import TensorpressError
from tensorpress.schedules.decode_stage import CPUDecodeOrder, DecodeStage, StoredBuffer

CODE_MIN, CODE_MAX = -128, 127


def int8_scales(w: np.ndarray) -> np.ndarray:
    """float16 [M]: absmax(row) / 127.5 rounded to fp16 (zero rows 0, clamped to fp16's finite range)."""
    absmax = np.abs(w).max(axis=1, initial=0.0).astype(np.float64)
    return round_scales_to_fp16(absmax / ((CODE_MAX - CODE_MIN) / 2))


def quantize_int8(w: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 [M, K]: round(w / scales[row]) to nearest (ties to even), clamped to [-128, 127]."""
    s = scales.astype(np.float64)[:, None]
    q = np.divide(w.astype(np.float64), s, out=np.zeros(w.shape, np.float64), where=s > 0)
    return np.clip(np.rint(q), CODE_MIN, CODE_MAX).astype(np.int8)


@dataclass(frozen=True)
class Int8WeightFormat(WeightFormat):
    """int8 codes with one fp16 scale per output channel (see the module docstring)."""

    name: str = "int8"

    def pack(self, w: np.ndarray) -> PackedWeight:
        w = check_weight(w)
        if not np.isfinite(w).all():
            raise TensorpressError("int8 cannot quantise a weight holding inf or NaN; check the model's weights.")
        scales = int8_scales(w)
        return PackedWeight(self.name, w.shape, {"codes": quantize_int8(w, scales), "scales": scales})

    def unpack(self, packed: PackedWeight) -> np.ndarray:
        codes, scales = packed.arrays["codes"], packed.arrays["scales"]
        return (codes.astype(np.float64) * scales.astype(np.float64)[:, None]).astype(np.float32)

    def stored_bytes(self, m: int, k: int) -> int:
        return m * k + 2 * m

    def code_bits(self) -> int:
        return 8

    def decode_stage(self) -> Int8Decode:
        return Int8Decode(self.name)


def _in_order(col):
    return col  # a row's codes already lie in K order, 8 to a 64-bit load


class Int8Decode(DecodeStage):
    """W[m, k] = codes[m, k] * scales[m]; capabilities: row scale, shared staging of the codes, and
    word-order decode on the CPU (8 consecutive codes of a row per vector load, in K order)."""

    scales_rows = True
    cpu_decode_order = CPUDecodeOrder(_in_order, group=8, run=8)

    def __init__(self, name: str):
        self.name = name

    def stored_buffers(self, m: int, k: int) -> list[StoredBuffer]:
        return [StoredBuffer("codes", (m, k), "int8"), StoredBuffer("scales", (m,), "float16")]

    def staged_buffers(self, m: int, k: int) -> list[str]:
        return ["codes"]  # a K tile of a row is block_k contiguous bytes; the scales stay global

    def decode(self, stored, row, col, dtype: str):
        codes, scales = stored
        if dtype == "float16":  # one rounding, of the exact product (numpy: unpack(...).astype(float16))
            return codes[row, col].astype("float16") * scales[row]
        return codes[row, col].astype(dtype) * scales[row].astype(dtype)

    def unscaled_decode(self, stored, row, col, dtype: str):
        return stored[0][row, col].astype(dtype)  # exact: |code| <= 128 fits fp16's 11 bits

    def row_scale(self, stored, row):
        return stored[1][row].astype("float32")
