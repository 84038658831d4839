"""FPx weights: the decode stage of the weight GEMM for eXmY codes in bit planes + fp16 row scales.

Stored buffers (`compiler/formats/fpx_layout.py` has the layout and its picture):
    plane<p> uint32 [plane_words(M, K, p)] for each plane width p of the code, widest first
    scales   float16 [M]

W[m, k] is rebuilt with integer and bit operations only, no lookup table:

    code  = OR over planes of ((plane_p[word_index] >> bit_offset) & (2^p - 1)) << shift_p
    bits  = (sign << 15) | ((e << Y | m) << (10 - Y))        an fp16 bit pattern with exponent field e
    h     = reinterpret<float16>(bits)                         = value * 2^(bias - 15)
    w     = (h * 2^(15 - bias)) * scale                        two fp16 multiplies

Why this is exact. With fp16 exponent field e (0 <= e <= 15 as X <= 4) and mantissa m << (10 - Y),
h is 2^(e-15) * (1 + m/2^Y) for e > 0 and 2^-14 * m/2^Y for e == 0, i.e. the eXmY value times
2^(bias-15) in both cases, fp16 subnormals included. The product by 2^(15-bias) (<= 2^15) is an
exactly representable fp16 (at most Y + 1 <= 8 significant bits, magnitude in [2^-(bias+Y-1), 480]),
so the first multiply is exact. The scale is applied by a second multiply: folding scale * 2^(15-bias)
into one fp16 constant would overflow for scales above 65504 / 2^(15-bias) (e.g. 4.0 for e2m3). The
second multiply rounds once, to the fp16 nearest to value * scale, which is what numpy's
decode(...).astype(float16) gives; with a float32 output dtype both factors are widened first and the
product (<= 8 + 11 significant bits) is exact, equal to numpy's float32 decode bit for bit.
"""

from __future__ import annotations

from tvm import te, tirx

from tensorpress.compiler.formats import fpx, fpx_layout, registry
from tensorpress.schedules.weight_gemm import DecodeStage, StoredBuffer, register_decode_stage

_FP16_MANTISSA_BITS = 10
_FP16_EXPONENT_BIAS = 15


class FPxDecode(DecodeStage):
    """W[m, k] = value(eXmY code at (m, k)) * scales[m], codes read from the bit planes."""

    def __init__(self, name: str, ebits: int, mbits: int):
        fpx.check_format(ebits, mbits)
        self.name = name
        self.ebits = ebits
        self.mbits = mbits
        self.bits = fpx.code_bits(ebits, mbits)
        self.widths = fpx_layout.plane_widths(self.bits)
        self.shifts = fpx_layout.plane_shifts(self.bits)

    def stored_buffers(self, m: int, k: int) -> list[StoredBuffer]:
        planes = [
            StoredBuffer(fpx_layout.plane_name(p), (fpx_layout.plane_words(m, k, p),), "uint32")
            for p in self.widths
        ]
        return [*planes, StoredBuffer("scales", (m,), "float16")]

    def unsupported_reason(self, m: int, k: int) -> str | None:
        return fpx_layout.unsupported_shape_reason(m, k)

    def decode_code(self, planes: list[te.Tensor], row: tirx.PrimExpr, col: tirx.PrimExpr, k_padded: int):
        """uint32 TIR expression: the eXmY code of W[row, col]; k_padded is K rounded up to TILE_K."""
        code = None
        for plane, width, shift in zip(planes, self.widths, self.shifts):
            word = plane[fpx_layout.word_index(row, col, width, k_padded)]
            offset = fpx_layout.bit_offset(col, width).astype("uint32")
            field = (word >> offset) & _u32((1 << width) - 1)
            field = field << _u32(shift) if shift else field
            code = field if code is None else code | field
        return code

    def decode(self, stored: list[te.Tensor], row: tirx.PrimExpr, col: tirx.PrimExpr, dtype: str):
        *planes, scales = stored
        code = self.decode_code(planes, row, col, _padded_k(planes[0], self.widths[0], scales))
        magnitude_bits = self.ebits + self.mbits
        sign = (code >> _u32(magnitude_bits)) & _u32(1)
        magnitude = code & _u32((1 << magnitude_bits) - 1)
        fp16_bits = (sign << _u32(15)) | (magnitude << _u32(_FP16_MANTISSA_BITS - self.mbits))
        h = tirx.reinterpret("float16", fp16_bits.astype("uint16"))
        exponent_fix = float(2 ** (_FP16_EXPONENT_BIAS - fpx.exponent_bias(self.ebits)))
        value = h * tirx.const(exponent_fix, "float16")  # exact, see the module docstring
        scale = scales[row]
        if dtype == "float16":
            return value * scale
        return value.astype(dtype) * scale.astype(dtype)


def _u32(value: int) -> tirx.PrimExpr:
    return tirx.const(value, "uint32")


def _padded_k(plane: te.Tensor, width: int, scales: te.Tensor) -> int:
    """Kp of the weight, from a plane's size and M (`decode` sees only the stored buffers)."""
    m_padded = fpx_layout.padded_shape(int(scales.shape[0]), 1)[0]
    return int(plane.shape[0]) * fpx_layout.WORD_BITS // (width * m_padded)


def _register_fpx_stages() -> dict[str, FPxDecode]:
    """One stage per FPx name of the weight-format registry (eXmY and the aliases fp6, fp5, ...)."""
    stages = {}
    for name, fmt in registry.WEIGHT_FORMATS.items():
        if isinstance(fmt, registry.FPxFormat):
            stages[name] = FPxDecode(name, fmt.ebits, fmt.mbits)
            register_decode_stage(stages[name])
    return stages


FPX_DECODE_STAGES = _register_fpx_stages()
