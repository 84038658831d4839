"""FPx weights (FP6-LLM): eXmY codes in bit planes with one fp16 scale per output channel.

    fmt = get_weight_format("fp6")        # FPxFormat e3m2; also fp6_e2m3, fp5, fp4, every eXmY
    packed = fmt.pack(w)                  # {"plane4", "plane2", "scales"} for e3m2
    fmt.decode_stage()                    # FPxDecode: the TIR below, read by every kernel

The codes and their quantiser are `fpx_codes.py`; the bit-plane layout, with its picture, is
`fpx_layout.py`. Stored buffers:
    plane<p> uint32 [M, Kp * p / 32] for each plane width p of the code, widest first
    scales   float16 [M]

The decode stage. On the Tensor Core template the planes are staged: each K tile of them travels to
shared memory by cp.async, compressed, and each warp decodes them from there straight into its mma
B fragments, two weights per 32-bit register (fragment decode, `tensorcore/fragment_decode.py`).
The per-row scales stay in global memory and are applied once per output (row scale). On the CPU
the same decode expressions read global memory.

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

import dataclasses
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from tensorpress.compiler.formats import fpx_codes as fpx
from tensorpress.compiler.formats import fpx_layout
from tensorpress.compiler.formats.base import PackedWeight, WeightFormat, check_weight
from tensorpress.errors import ConfigError, TensorpressError
from tensorpress.schedules.decode_stage import CPUDecodeOrder, DecodeStage, StoredBuffer

if TYPE_CHECKING:
    from tvm import te, tirx

SCALE_SEARCHES = ("absmax", "mse", "act")  # act: needs calibration (`pack_calibrated`)
# Short names for the FPx formats of FP6-LLM; every eXmY is also registered under its own name.
FPX_ALIASES = {"fp6": (3, 2), "fp6_e2m3": (2, 3), "fp5": (2, 2), "fp4": (2, 1)}


@dataclass(frozen=True)
class FPxFormat(WeightFormat):
    """eXmY codes in bit planes (`fpx_layout`) with one fp16 scale per output channel (`fpx`).

    scale_search: "absmax" (scale = absmax / max value), "mse" (each channel's clip ratio from
    fpx.MSE_CLIP_RATIOS with the lowest squared error) or "act" (the ratio with the lowest error of the
    channel's output on the calibration activations: `pack_calibrated`, fpx.encode_act).
    """

    name: str
    ebits: int
    mbits: int
    scale_search: str = "absmax"

    def __post_init__(self):
        fpx.check_format(self.ebits, self.mbits)
        check_scale_search(self.scale_search)

    @property
    def stage_name(self) -> str:
        """The canonical eXmY name, under which the decode stage and packed weights go."""
        return f"e{self.ebits}m{self.mbits}"

    def encode(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes uint8 [M, K], scales float16 [M]) with this format's scale search."""
        w = check_weight(w)
        if self.scale_search == "act":
            raise TensorpressError("the act scale search needs the layer's calibration activations (pack_calibrated).")
        if self.scale_search == "mse":
            return fpx.encode_mse(w, self.ebits, self.mbits)
        return fpx.encode(w, self.ebits, self.mbits)

    def encode_calibrated(self, w: np.ndarray, gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`encode`, with the act search reading the layer's input Gram matrix X^T X [K, K]."""
        if self.scale_search != "act":
            return self.encode(w)
        return fpx.encode_act(check_weight(w), gram, self.ebits, self.mbits)

    def pack_calibrated(self, w: np.ndarray, gram: np.ndarray) -> PackedWeight:
        return self.pack_codes(*self.encode_calibrated(w, gram))

    def pack_codes(self, codes: np.ndarray, scales: np.ndarray) -> PackedWeight:
        planes = fpx_layout.pack_fpx_planes(codes, self.ebits, self.mbits)
        return PackedWeight(self.stage_name, codes.shape, {**planes, "scales": scales})

    def pack(self, w: np.ndarray) -> PackedWeight:
        return self.pack_codes(*self.encode(w))

    def unpack(self, packed: PackedWeight) -> np.ndarray:
        if packed.format != self.stage_name:
            raise TensorpressError(f"a {packed.format} weight cannot be unpacked as {self.stage_name}.")
        m, k = packed.shape
        codes = fpx_layout.unpack_fpx_planes(packed.arrays, m, k, self.ebits, self.mbits)
        return fpx.decode(codes, packed.arrays["scales"], self.ebits, self.mbits)

    def stored_bytes(self, m: int, k: int) -> int:
        bits = fpx.code_bits(self.ebits, self.mbits)
        planes = sum(fpx_layout.plane_words(m, k, p) * 4 for p in fpx_layout.plane_widths(bits))
        return planes + 2 * m

    def with_scale_search(self, scale_search: str) -> FPxFormat:
        return dataclasses.replace(self, scale_search=scale_search)

    def code_bits(self) -> int:
        return fpx.code_bits(self.ebits, self.mbits)

    def decode_stage(self) -> FPxDecode:
        return fpx_decode_stage(self.ebits, self.mbits)


@dataclass(frozen=True)
class FPxAutoFormat(WeightFormat):
    """Per weight, the candidate eXmY (all of one bit width) with the lowest reconstruction error
    sum((W - decode(encode(W)))^2); ties go to the earlier candidate."""

    name: str
    candidates: tuple[tuple[int, int], ...]
    scale_search: str = "absmax"

    def __post_init__(self):
        check_scale_search(self.scale_search)
        if len({fpx.code_bits(e, m) for e, m in self.candidates}) != 1:
            raise ConfigError(f"the candidates of {self.name} must all have the same number of bits.")

    def _formats(self) -> list[FPxFormat]:
        return [FPxFormat(f"e{e}m{m}", e, m, self.scale_search) for e, m in self.candidates]

    def _choose(self, w: np.ndarray, gram: np.ndarray | None = None) -> tuple[FPxFormat, np.ndarray, np.ndarray]:
        best = None
        for fmt in self._formats():
            if gram is None:
                codes, scales = fmt.encode(w)
                err = float(fpx.reconstruction_error(w, codes, scales, fmt.ebits, fmt.mbits).sum())
            else:  # the candidate whose layer output on the calibration activations is closest
                codes, scales = fmt.encode_calibrated(w, gram)
                err = float(fpx.output_error(w, codes, scales, fmt.ebits, fmt.mbits, gram).sum())
            if best is None or err < best[0]:
                best = (err, fmt, codes, scales)
        assert best is not None
        return best[1], best[2], best[3]

    def resolve(self, w: np.ndarray) -> FPxFormat:
        return self._choose(check_weight(w))[0]

    def pack(self, w: np.ndarray) -> PackedWeight:
        fmt, codes, scales = self._choose(check_weight(w))
        return fmt.pack_codes(codes, scales)

    def pack_calibrated(self, w: np.ndarray, gram: np.ndarray) -> PackedWeight:
        fmt, codes, scales = self._choose(check_weight(w), np.asarray(gram, dtype=np.float64))
        return fmt.pack_codes(codes, scales)

    def unpack(self, packed: PackedWeight) -> np.ndarray:
        for fmt in self._formats():
            if fmt.stage_name == packed.format:
                return fmt.unpack(packed)
        raise TensorpressError(f"{self.name} never stores a {packed.format} weight.")

    def stored_bytes(self, m: int, k: int) -> int:
        return self._formats()[0].stored_bytes(m, k)

    def with_scale_search(self, scale_search: str) -> FPxAutoFormat:
        return dataclasses.replace(self, scale_search=scale_search)

    def code_bits(self) -> int:
        return self._formats()[0].code_bits()  # every candidate has the same width

    def decode_stage(self) -> FPxDecode:
        return self._formats()[0].decode_stage()


def fpx_formats() -> dict[str, WeightFormat]:
    """The registry's FPx entries: the aliases (fp6, fp5, ...), every supported eXmY, and fp6-auto."""
    formats: dict[str, WeightFormat] = {}
    for name, (ebits, mbits) in FPX_ALIASES.items():
        formats[name] = FPxFormat(name, ebits, mbits)
    for ebits in range(1, fpx.MAX_EXPONENT_BITS + 1):
        for mbits in range(fpx.MAX_CODE_BITS - ebits):
            formats[f"e{ebits}m{mbits}"] = FPxFormat(f"e{ebits}m{mbits}", ebits, mbits)
    formats["fp6-auto"] = FPxAutoFormat("fp6-auto", ((3, 2), (2, 3)))
    return formats


def check_scale_search(scale_search: str) -> None:
    if scale_search not in SCALE_SEARCHES:
        raise ConfigError(f"unknown scale search {scale_search!r}; valid choices: {', '.join(SCALE_SEARCHES)}.")


# ---------------------------------------------------------------------------------------- decode stage
# The TIR of the decode. TVM is imported inside the methods, so this file (and the registry) imports
# without it.

_FP16_MANTISSA_BITS = 10
_FP16_EXPONENT_BIAS = 15


@cache
def fpx_decode_stage(ebits: int, mbits: int) -> FPxDecode:
    """The decode stage of eXmY (one object per format, named by its canonical eXmY name)."""
    return FPxDecode(f"e{ebits}m{mbits}", ebits, mbits)


class FPxDecode(DecodeStage):
    """W[m, k] = value(eXmY code at (m, k)) * scales[m], codes read from the bit planes.

    Capabilities: row scale, shared staging of every plane, fragment decode (a lane's plane words
    cover a group of 32 k: one group at a time), and word-order decode on the CPU (rows read word by
    word, the 8 codes of a plane4 word at a time, `fpx_layout.decode_position`).
    """

    scales_rows = True
    fragment_k = fpx_layout.GROUP_K
    cpu_decode_order = CPUDecodeOrder(fpx_layout.decode_position, fpx_layout.GROUP_K, fpx_layout.DECODE_RUN)

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

    def staged_buffers(self, m: int, k: int) -> list[str]:
        """Every plane (a K tile of each is a rectangle of whole words); the scales stay global."""
        return [fpx_layout.plane_name(p) for p in self.widths]

    def unsupported_reason(self, m: int, k: int) -> str | None:
        return fpx_layout.unsupported_shape_reason(m, k)

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

    def code_fp16_bits(self, code: tirx.PrimExpr, pair: bool = False) -> tirx.PrimExpr:
        """uint32 TIR: (sign << 15) | (magnitude << (10 - Y)) of the whole code in the low bits of `code`
        (higher bits ignored): `fp16_bits`' pattern for codes stored unsplit (a sparse code stream).
        pair=True: a second code in bits 16.., its pattern in bits 16..31."""
        spread = 0x0001_0001 if pair else 1
        sign_bit = self.ebits + self.mbits
        magnitude = (code & _u32(((1 << sign_bit) - 1) * spread)) << _u32(_FP16_MANTISSA_BITS - self.mbits)
        return magnitude | ((code & _u32((1 << sign_bit) * spread)) << _u32(15 - sign_bit))

    def decode(self, stored: list[te.Tensor], row: tirx.PrimExpr, col: tirx.PrimExpr, dtype: str):
        return self.scaled(self.unscaled_decode(stored, row, col, "float16"), stored[-1][row], dtype)

    def scaled(self, h: tirx.PrimExpr, scale: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
        """W in `dtype` from the fp16 pattern value h and the row's fp16 scale (see the module docstring:
        the first multiply is exact, the second rounds once)."""
        from tvm import tirx

        value = h * tirx.const(self.exponent_fix, "float16")  # exact, see the module docstring
        if dtype == "float16":
            return value * scale
        return value.astype(dtype) * scale.astype(dtype)

    @property
    def exponent_fix(self) -> float:
        """2^(15 - bias): the factor from the fp16 pattern's value to the code's value (a power of 2)."""
        return float(2 ** (_FP16_EXPONENT_BIAS - fpx.exponent_bias(self.ebits)))

    def unscaled_decode(self, stored: list[te.Tensor], row: tirx.PrimExpr, col: tirx.PrimExpr, dtype: str):
        """h = value(code) * 2^(bias - 15): the code's fp16 bit pattern reinterpreted (exact), in `dtype`."""
        from tvm import tirx

        bits = self.fp16_bits(stored[: len(self.widths)], row, col, funnel=False)
        h = tirx.reinterpret("float16", bits.astype("uint16"))
        return h if dtype == "float16" else h.astype(dtype)

    def row_scale(self, stored: list[te.Tensor], row: tirx.PrimExpr) -> tirx.PrimExpr:
        """float32 scales[row] * 2^(15 - bias): exact (an fp16 times a power of two <= 2^15)."""
        from tvm import tirx

        return stored[-1][row].astype("float32") * tirx.const(self.exponent_fix, "float32")

    def fragment_pair(
        self, staged: list, row: tirx.PrimExpr, col: tirx.PrimExpr, bind=None, rows_above=None
    ) -> tirx.PrimExpr:
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
    from tvm import tirx

    n = ((from_bit + (32 - to_bit)) % 32).astype("uint64")
    wide = word.astype("uint64")
    return (((wide << tirx.const(32, "uint64")) | wide) >> n).astype("uint32")


def _u32(value: int) -> tirx.PrimExpr:
    from tvm import tirx

    return tirx.const(value, "uint32")
