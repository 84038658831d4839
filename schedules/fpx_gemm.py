"""FPx weights: the decode stage of the weight GEMM for eXmY codes in bit planes + fp16 row scales.

Stored buffers (`compiler/formats/fpx_layout.py` has the layout and its picture):
    plane<p> uint32 [M, Kp * p / 32] for each plane width p of the code, widest first
    scales   float16 [M]

On the Tensor Core template the planes are staged (`StagedDecode`): each K tile of them travels to
shared memory by cp.async, compressed, and each warp decodes them from there straight into its mma
B fragments, two weights per 32-bit register (`FragmentDecode`, `tensorcore/fragment_decode.py`).
The per-row scales stay in global memory and are applied once per output (`RowScaledDecode`). On
the CPU the same decode expressions read global memory.

W[m, k] is rebuilt with integer and bit operations only, no lookup table:

    bits  = (sign << 15) | ((e << Y | m) << (10 - Y))        an fp16 bit pattern with exponent field e
            = OR over planes of rotate(plane_p[row, word], to fp16 place) & mask_p     (`fp16_bits`)
    h     = reinterpret<float16>(bits)                         = value * 2^(bias - 15)
    W     = h * row_scale,  row_scale = float32(scale) * 2^(15 - bias)     (`unscaled_decode`, `row_scale`)

Why this is exact. With fp16 exponent field e (0 <= e <= 15 as X <= 4) and mantissa m << (10 - Y),
h is 2^(e-15) * (1 + m/2^Y) for e > 0 and 2^-14 * m/2^Y for e == 0, i.e. the eXmY value times
2^(bias-15) in both cases, fp16 subnormals included, and never inf or NaN (e <= 15 < 31), whatever
the bits. row_scale is an fp16 times a power of two <= 2^15: exact in fp32.

Where the scale goes. The weight GEMM (`make_weight_gemm`) multiplies by row_scale after the sum
over k: Y[n, m] = row_scale[m] · Σ_k X[n, k]·h[m, k]. The products X·h are exact in fp32 (11 + 8
significant bits), so Y differs from Σ_k X·W with the exact (fp32) W only by the rounding of the fp32
sums and of the one final multiply; no weight is rounded to fp16. Made with
row_scale_in_epilogue=False, the PrimFunc uses `decode` instead: w = (h * 2^(15 - bias)) * scale in
the compute dtype, two multiplies, the first exact (<= 8 significant bits, |w| / scale <= 480), the
second rounding once to the fp16 nearest value * scale (numpy's decode(...).astype(float16)); folding
scale * 2^(15-bias) into one fp16 constant would overflow for scales above 65504 / 2^(15-bias).

Cost on the GPU (benchmarks/gemm_sass.py, sm_90a, M = K = 4096, n16 tiles): per FP6 weight pair
one funnel shift or constant shift per plane plus the masks and ORs, ~6 integer ops (3 per weight),
and one LDS per plane, row and 32 k a lane: 4.4 thread-instructions per weight for the whole main
loop of n16m128k64, where an H100 streaming FP6 at full bandwidth allows 6.9.
"""

from __future__ import annotations

from tvm import te, tirx

from tensorpress.compiler.formats import fpx, fpx_layout, registry
from tensorpress.schedules.tensorcore.decode_hints import FragmentDecode, RowScaledDecode
from tensorpress.schedules.weight_gemm import DecodeStage, StoredBuffer, register_decode_stage

_FP16_MANTISSA_BITS = 10
_FP16_EXPONENT_BIAS = 15


class FPxDecode(DecodeStage, FragmentDecode, RowScaledDecode):
    """W[m, k] = value(eXmY code at (m, k)) * scales[m], codes read from the bit planes."""

    fragment_k = fpx_layout.GROUP_K  # a lane's plane words cover a group of 32 k: decode one at a time
    # CPU (`schedules/cpu/decode_along_k.py`): rows read word by word, 8 codes of a plane4 word at a time
    cpu_decode_group = fpx_layout.GROUP_K
    cpu_decode_run = fpx_layout.DECODE_RUN

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
            StoredBuffer(fpx_layout.plane_name(p), fpx_layout.plane_shape(m, k, p), "uint32") for p in self.widths
        ]
        return [*planes, StoredBuffer("scales", (m,), "float16")]

    def shared_staged_buffers(self, m: int, k: int) -> list[str]:
        """Every plane (a K tile of each is a rectangle of whole words); the scales stay global."""
        return [fpx_layout.plane_name(p) for p in self.widths]

    def unsupported_reason(self, m: int, k: int) -> str | None:
        return fpx_layout.unsupported_shape_reason(m, k)

    def cpu_decode_position(self, col: tirx.PrimExpr) -> tirx.PrimExpr:
        """The word-by-word order of a row's columns (`fpx_layout.decode_position`, its own inverse)."""
        return fpx_layout.decode_position(col)

    def word_in_row(self, col: tirx.PrimExpr, width: int) -> tirx.PrimExpr:
        """The layout's word of column `col` in a row of the `width`-bit plane (`fpx_layout`)."""
        return fpx_layout.word_in_row(col, width)

    def bit_offset(self, col: tirx.PrimExpr, width: int) -> tirx.PrimExpr:
        """The layout's first bit of column `col`'s field in that word (`fpx_layout`)."""
        return fpx_layout.bit_offset(col, width)

    def fp16_bits(
        self,
        planes: list[te.Tensor],
        row: tirx.PrimExpr,
        col: tirx.PrimExpr,
        pair: bool = False,
        funnel: bool = True,
    ) -> tirx.PrimExpr:
        """uint32 TIR expression: (sign << 15) | (magnitude << (10 - Y)) of the code of W[row, col].

        funnel=True: each plane's field is rotated straight to its place in the fp16 pattern and
        masked: one funnel shift and one LOP3 on the GPU. The sign, the top bit of the last plane,
        lands at bit 10 + X with it and is moved up by a constant shift (one rotation per plane keeps
        one rotation amount per plane live: more made ptxas spill). The rotation amounts depend on the
        column only: per thread, they are loop invariants.

        funnel=False: the same fields placed with plain 32-bit shifts, (word >> offset) & mask, then
        << to the fp16 place: what a CPU runs best (x86 has no vector rotate before AVX-512; the
        64-bit funnel idiom becomes 64-bit vector lanes there). Same bits, see the tests.

        pair=True (col even): the half2 of W[row, col] (bits 0..15) and W[row, col + 1] (16..31) for
        the same instructions. The layout keeps a pair's fields in one word, 16 bits apart, so the
        rotation that places the first also places the second; only the masks double. This is the
        decode a lane of the mma B fragment runs (SWAR, two weights per integer op).
        """
        spread = 0x0001_0001 if pair else 1  # a mask for bits 0..15 copied to 16..31
        bits = None
        sign_bit = self.ebits + self.mbits  # the code bit holding the sign
        for plane, width, shift in zip(planes, self.widths, self.shifts):
            word = plane[row, self.word_in_row(col, width)]
            offset = self.bit_offset(col, width)
            magnitude_width = min(width, sign_bit - shift)  # the sign plane keeps its top bit apart
            target = shift + _FP16_MANTISSA_BITS - self.mbits  # field bit 0 -> fp16 bit `target`
            if not funnel:
                parts = _shifted_fields(word, offset, width, magnitude_width, target, spread)
            elif magnitude_width > 0:
                rotated = _rotate_right(word, offset, target)
                parts = [rotated & _u32((((1 << magnitude_width) - 1) << target) * spread)]
                if magnitude_width < width:  # the sign sits at bit 10 + X of `rotated`
                    up = 15 - (_FP16_MANTISSA_BITS + self.ebits)
                    parts.append((rotated << _u32(up)) & _u32((1 << 15) * spread))
            else:  # a plane holding the sign alone
                parts = [_rotate_right(word, offset, 15) & _u32((1 << 15) * spread)]
            for part in parts:
                bits = part if bits is None else bits | part
        return bits

    def decode(self, stored: list[te.Tensor], row: tirx.PrimExpr, col: tirx.PrimExpr, dtype: str):
        *planes, scales = stored
        h = self.unscaled_decode(stored, row, col, "float16")
        value = h * tirx.const(self.exponent_fix, "float16")  # exact, see the module docstring
        scale = scales[row]
        if dtype == "float16":
            return value * scale
        return value.astype(dtype) * scale.astype(dtype)

    @property
    def exponent_fix(self) -> float:
        """2^(15 - bias): the factor from the fp16 pattern's value to the code's value (a power of 2)."""
        return float(2 ** (_FP16_EXPONENT_BIAS - fpx.exponent_bias(self.ebits)))

    def unscaled_decode(self, stored: list[te.Tensor], row: tirx.PrimExpr, col: tirx.PrimExpr, dtype: str):
        """h = value(code) * 2^(bias - 15): the code's fp16 bit pattern reinterpreted (exact), in `dtype`."""
        bits = self.fp16_bits(stored[: len(self.widths)], row, col, funnel=False)
        h = tirx.reinterpret("float16", bits.astype("uint16"))
        return h if dtype == "float16" else h.astype(dtype)

    def row_scale(self, stored: list[te.Tensor], row: tirx.PrimExpr) -> tirx.PrimExpr:
        """float32 scales[row] * 2^(15 - bias): exact (an fp16 times a power of two <= 2^15)."""
        return stored[-1][row].astype("float32") * tirx.const(self.exponent_fix, "float32")

    def fragment_pair(self, staged: list, row: tirx.PrimExpr, col: tirx.PrimExpr) -> tirx.PrimExpr:
        """The half2 of the unscaled W[row, col], W[row, col + 1] (col even): `fp16_bits(pair=True)`."""
        return self.fp16_bits(staged, row, col, pair=True)


def _shifted_fields(word, offset, width: int, magnitude_width: int, target: int, spread: int) -> list:
    """A plane's field moved to its fp16 place with plain shifts: the magnitude bits to `target`,
    the sign (the field's top bit, when the plane holds it) to bit 15."""
    field = (word >> offset.astype("uint32")) & _u32(((1 << width) - 1) * spread)
    parts = []
    if magnitude_width > 0:
        parts.append((field & _u32(((1 << magnitude_width) - 1) * spread)) << _u32(target))
    if magnitude_width < width:  # the field's top bit is the sign
        sign = (field >> _u32(width - 1)) & _u32(spread) if width > 1 else field
        parts.append(sign << _u32(15))
    return parts


def _rotate_right(word: tirx.PrimExpr, from_bit, to_bit: int) -> tirx.PrimExpr:
    """uint32 `word` rotated so that its bit `from_bit` (an int expression < 32) lands on `to_bit`.

    Written as the low half of (word:word) >> n, n = (from_bit - to_bit) mod 32: nvcc makes it one
    funnel shift (SHF.R.U64 on a register pair), LLVM one rotate/shrd. (The textbook rotate idiom
    (w >> n) | (w << (-n & 31)) costs three instructions once TVM hoists the two amounts apart.)
    """
    n = ((from_bit + (32 - to_bit)) % 32).astype("uint64")
    wide = word.astype("uint64")
    return (((wide << tirx.const(32, "uint64")) | wide) >> n).astype("uint32")


def _u32(value: int) -> tirx.PrimExpr:
    return tirx.const(value, "uint32")


def _register_fpx_stages() -> dict[str, FPxDecode]:
    """One stage per FPx name of the weight-format registry (eXmY and the aliases fp6, fp5, ...)."""
    stages = {}
    for name, fmt in registry.WEIGHT_FORMATS.items():
        if isinstance(fmt, registry.FPxFormat):
            stages[name] = FPxDecode(name, fmt.ebits, fmt.mbits)
            register_decode_stage(stages[name])
    return stages


FPX_DECODE_STAGES = _register_fpx_stages()
