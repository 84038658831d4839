"""eXmY codes (FP6-LLM style): code values and the quantiser with one fp16 scale per output channel.

An eXmY code has 1 + X + Y bits, most significant first:

    bit  X+Y        X+Y-1 ... Y        Y-1 ... 0
         sign       exponent e (X)     mantissa m (Y)

    bias = 2^(X-1) - 1
    e == 0:  value = (-1)^sign * 2^(1 - bias) * (m / 2^Y)          (subnormals, and +-0)
    e >  0:  value = (-1)^sign * 2^(e - bias) * (1 + m / 2^Y)

Every exponent code is a finite value: there is no inf and no NaN (so e2m1 is exactly the OCP FP4
value set {0, 0.5, 1, 1.5, 2, 3, 4, 6}, while e4m3 here reaches 480, unlike OCP's E4M3FN at 448).
The magnitude bits (e, m) read as an unsigned integer grow with the value, which the quantiser and
the kernel's decode both rely on.

Supported: 1 <= X <= 4 (the exponent must fit fp16's 5-bit field without reaching its inf code, see
its decode stage in `fpx.py`), Y >= 0, and 1 + X + Y <= 8 (a code fits one uint8).

Quantiser (`encode`): per output channel (row of W[M, K]) an fp16 scale s = absmax / max finite
value, rounded to fp16; each weight becomes the representable value nearest to w / s, ties to the
even code, magnitudes beyond the largest value saturate. The codes are chosen against the fp16 scale
actually stored, so `decode(encode(w))` is exactly `nearest(w / s16) * s16`.
"""

from __future__ import annotations

import numpy as np

from tensorpress.compiler.formats.base import round_scales_to_fp16
from tensorpress.errors import ConfigError, TensorpressError

MAX_EXPONENT_BITS = 4
MAX_CODE_BITS = 8

# Clip ratios tried per channel by the MSE scale search (ratio 1.0 is absmax, so MSE never loses).
MSE_CLIP_RATIOS = np.round(np.arange(0.50, 1.0001, 0.02), 2)


def check_format(ebits: int, mbits: int) -> None:
    """Raise ConfigError unless eXmY with X = ebits, Y = mbits is a format this module supports."""
    if not (isinstance(ebits, (int, np.integer)) and isinstance(mbits, (int, np.integer))):
        raise ConfigError(f"FPx ebits and mbits must be integers, got ebits={ebits!r}, mbits={mbits!r}.")
    if not 1 <= ebits <= MAX_EXPONENT_BITS or mbits < 0 or 1 + ebits + mbits > MAX_CODE_BITS:
        raise ConfigError(
            f"FPx format e{ebits}m{mbits} is not supported: use 1 <= ebits <= {MAX_EXPONENT_BITS}, "
            f"mbits >= 0 and 1 + ebits + mbits <= {MAX_CODE_BITS}."
        )


def code_bits(ebits: int, mbits: int) -> int:
    """Bits per code: 1 sign + ebits + mbits."""
    return 1 + ebits + mbits


def exponent_bias(ebits: int) -> int:
    """2^(ebits-1) - 1."""
    return (1 << (ebits - 1)) - 1


def magnitudes(ebits: int, mbits: int) -> np.ndarray:
    """float64 [2^(X+Y)]: the non-negative value of each magnitude code (e << Y | m), ascending."""
    check_format(ebits, mbits)
    mag = np.arange(1 << (ebits + mbits), dtype=np.int64)
    e, m = mag >> mbits, mag & ((1 << mbits) - 1)
    bias = exponent_bias(ebits)
    subnormal = np.ldexp(m.astype(np.float64), 1 - bias - mbits)
    normal = np.ldexp(((1 << mbits) + m).astype(np.float64), e - bias - mbits)
    return np.where(e == 0, subnormal, normal)


def code_values(ebits: int, mbits: int) -> np.ndarray:
    """float64 [2^(1+X+Y)]: the value of every code, indexed by the code (negative codes give -0.0 etc.)."""
    mags = magnitudes(ebits, mbits)
    return np.concatenate([mags, -mags])


def max_value(ebits: int, mbits: int) -> float:
    """The largest finite value of eXmY, e.g. 28.0 for e3m2, 7.5 for e2m3, 6.0 for e2m1."""
    return float(magnitudes(ebits, mbits)[-1])


def absmax_scales(w: np.ndarray, ebits: int, mbits: int, clip: float | np.ndarray = 1.0) -> np.ndarray:
    """float16 [M]: clip * absmax(row) / max_value, rounded to fp16 (ties to even).

    `clip` (a scalar or float [M]) shrinks the range for the MSE search. A row of zeros gets scale 0.
    A non-zero row whose scale would underflow fp16 gets its smallest subnormal, one that would
    overflow gets fp16's largest finite value (its weights then saturate).
    """
    w = _check_weight(w)
    absmax = np.abs(w).max(axis=1, initial=0.0).astype(np.float64)
    return round_scales_to_fp16(absmax * np.asarray(clip, dtype=np.float64) / max_value(ebits, mbits))


def quantize(w: np.ndarray, scales: np.ndarray, ebits: int, mbits: int) -> np.ndarray:
    """uint8 [M, K]: the code nearest to w / scales[row] (ties to even, saturating), sign kept.

    w: float [M, K]; scales: float16 [M], >= 0 (a zero scale gives the signed-zero codes).
    """
    w = _check_weight(w)
    scales = _check_scales(scales, w.shape[0])
    mags = magnitudes(ebits, mbits)
    midpoints = (mags[:-1] + mags[1:]) / 2  # exact in float64
    s = scales.astype(np.float64)[:, None]
    a = np.abs(w.astype(np.float64))
    # |w| / s in float64 is exact enough to compare with a midpoint: midpoint * s has at most
    # (Y + 2) + 11 significant bits and |w| 24, so they are equal or differ by >= 2^-25 relatively,
    # far beyond the 2^-53 rounding of the division. Equality is therefore an exact tie.
    q = np.divide(a, s, out=np.zeros_like(a), where=s > 0)
    mag = np.searchsorted(midpoints, q, side="left")  # number of midpoints strictly below q
    nearest_mid = midpoints[np.minimum(mag, len(midpoints) - 1)]
    tie_to_odd = (mag < len(midpoints)) & (q == nearest_mid) & (mag % 2 == 1)
    mag = mag + tie_to_odd  # a tie between codes mag and mag+1 goes to the even one
    sign = np.signbit(w).astype(np.int64) << (ebits + mbits)
    return (sign | mag).astype(np.uint8)


def encode(w: np.ndarray, ebits: int, mbits: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantise W[M, K] to eXmY with absmax per-row fp16 scales.

    Returns (codes: uint8 [M, K], one code per weight in the low 1+X+Y bits; scales: float16 [M]).
    """
    check_format(ebits, mbits)
    scales = absmax_scales(w, ebits, mbits)
    return quantize(w, scales, ebits, mbits), scales


def decode(codes: np.ndarray, scales: np.ndarray, ebits: int, mbits: int) -> np.ndarray:
    """float32 [M, K]: value(codes[m, k]) * scales[m], exact (an fp16 times a <= 8-bit float fits fp32)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype != np.uint8:
        raise TensorpressError(f"FPx codes must be a 2-D uint8 array, got {codes.dtype} {codes.shape}.")
    bits = code_bits(ebits, mbits)
    if codes.size and int(codes.max()) >> bits:
        raise TensorpressError(f"FPx codes hold values above the {bits} bits of e{ebits}m{mbits}.")
    scales = _check_scales(scales, codes.shape[0])
    values = code_values(ebits, mbits)[codes]
    return (values * scales.astype(np.float64)[:, None]).astype(np.float32)


def reconstruction_error(w: np.ndarray, codes: np.ndarray, scales: np.ndarray, ebits: int, mbits: int):
    """float64 [M]: per-row sum of squared differences between w and decode(codes, scales)."""
    diff = w.astype(np.float64) - decode(codes, scales, ebits, mbits).astype(np.float64)
    return np.square(diff).sum(axis=1)


def encode_mse(
    w: np.ndarray, ebits: int, mbits: int, clip_ratios: np.ndarray = MSE_CLIP_RATIOS
) -> tuple[np.ndarray, np.ndarray]:
    """Like `encode`, but each row's scale is clip * absmax / max_value with the clip ratio (from
    `clip_ratios`, which should include 1.0) that gives the row the lowest squared error.

    Returns (codes uint8 [M, K], scales float16 [M]); ties between ratios keep the larger one.
    """
    w = _check_weight(w)
    return _encode_best_clip(
        w, ebits, mbits, clip_ratios, lambda codes, scales: reconstruction_error(w, codes, scales, ebits, mbits)
    )


def output_error(w: np.ndarray, codes: np.ndarray, scales: np.ndarray, ebits: int, mbits: int, gram: np.ndarray):
    """float64 [M]: per row m, ||(w_m - decode_m) X^T||^2 = d_m (X^T X) d_m^T, the squared error the
    quantisation adds to output channel m over the tokens X [T, K] whose Gram matrix X^T X is `gram`."""
    diff = w.astype(np.float64) - decode(codes, scales, ebits, mbits).astype(np.float64)
    return np.einsum("mk,mk->m", diff @ gram, diff)


def encode_act(
    w: np.ndarray, gram: np.ndarray, ebits: int, mbits: int, clip_ratios: np.ndarray = MSE_CLIP_RATIOS
) -> tuple[np.ndarray, np.ndarray]:
    """Like `encode_mse`, but each row's clip ratio minimises that row's output error on the
    calibration activations (`output_error`, X^T X = `gram` float [K, K]) instead of the weight error."""
    w = _check_weight(w)
    gram = np.asarray(gram, dtype=np.float64)
    if gram.shape != (w.shape[1], w.shape[1]) or not np.isfinite(gram).all():
        raise TensorpressError(f"the act scale search needs a finite [{w.shape[1]}, {w.shape[1]}] Gram matrix.")
    return _encode_best_clip(
        w, ebits, mbits, clip_ratios, lambda codes, scales: output_error(w, codes, scales, ebits, mbits, gram)
    )


def _encode_best_clip(w, ebits, mbits, clip_ratios, error) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the codes and scale of the clip ratio with the lowest `error(codes, scales)` [M]."""
    check_format(ebits, mbits)
    ratios = sorted(np.asarray(clip_ratios, dtype=np.float64), reverse=True)
    best_scales = absmax_scales(w, ebits, mbits, ratios[0])
    best_codes = quantize(w, best_scales, ebits, mbits)
    best_err = error(best_codes, best_scales)
    for clip in ratios[1:]:
        scales = absmax_scales(w, ebits, mbits, clip)
        codes = quantize(w, scales, ebits, mbits)
        err = error(codes, scales)
        better = err < best_err
        best_codes = np.where(better[:, None], codes, best_codes)
        best_scales = np.where(better, scales, best_scales)
        best_err = np.where(better, err, best_err)
    return best_codes, best_scales.astype(np.float16)


def _check_weight(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype.kind != "f":
        raise TensorpressError(f"FPx quantises a 2-D float weight [M, K], got {w.dtype} {w.shape}.")
    if not np.isfinite(w).all():
        raise TensorpressError("FPx cannot quantise a weight holding inf or NaN; check the model's weights.")
    return w


def _check_scales(scales: np.ndarray, rows: int) -> np.ndarray:
    scales = np.asarray(scales)
    if scales.dtype != np.float16 or scales.shape != (rows,):
        raise TensorpressError(f"FPx scales must be float16 [{rows}], got {scales.dtype} {scales.shape}.")
    if not (np.isfinite(scales) & (scales >= 0)).all():
        raise TensorpressError("FPx scales must be finite and non-negative.")
    return scales
