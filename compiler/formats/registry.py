"""Weight formats by the name the user gives (`--weights fp6`): every parameter of each scheme.

    fmt = get_weight_format("fp6", scale_search="mse")   # FPxFormat(name="fp6", ebits=3, mbits=2, ...)
    packed = fmt.pack(w)                 # PackedWeight: the arrays the artifact stores for W[M, K]
    w_hat = fmt.unpack(packed)           # float32 [M, K], the numpy reference of the kernel's decode
    fmt.stored_bytes(m, k), fmt.unsupported_reason(m, k)

`PackedWeight.format` names the decode stage (`schedules/*_gemm.py`) that reads the arrays; its
`arrays` are in that stage's `stored_buffers` order. `fp6-auto` chooses e3m2 or e2m3 per weight, so
its packed weights name the format it chose. Pure numpy: no TVM import here.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from tensorpress.compiler.formats import dense_panel, fpx, fpx_layout
from tensorpress.errors import ConfigError, TensorpressError

SCALE_SEARCHES = ("absmax", "mse")
MMA_MULTIPLE = 16  # the weight GEMM's mma.m16n8k16 tiles need M and K in multiples of this
# Short names for the FPx formats of FP6-LLM; every eXmY is also registered under its own name.
FPX_ALIASES = {"fp6": (3, 2), "fp6_e2m3": (2, 3), "fp5": (2, 2), "fp4": (2, 1)}


@dataclass(frozen=True)
class PackedWeight:
    """A weight W[M, K] as stored: `arrays` (in the decode stage's order) read by stage `format`."""

    format: str
    shape: tuple[int, int]
    arrays: dict[str, np.ndarray] = field(compare=False)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())


class WeightFormat(abc.ABC):
    """One registered weight format. Subclasses are frozen dataclasses with a `name` field."""

    name: str
    compresses: ClassVar[bool] = True  # False for the dense layouts (fp16 / fp32, plain or panels)

    def resolve(self, w: np.ndarray) -> WeightFormat:
        """The concrete format this weight is stored in (itself, except for choosers like fp6-auto)."""
        return self

    @abc.abstractmethod
    def pack(self, w: np.ndarray) -> PackedWeight:
        """Quantise float W[M, K] into the arrays the artifact stores."""

    @abc.abstractmethod
    def unpack(self, packed: PackedWeight) -> np.ndarray:
        """float32 [M, K] rebuilt from `packed`, bit for bit what the kernel's decode gives in fp32."""

    @abc.abstractmethod
    def stored_bytes(self, m: int, k: int) -> int:
        """Bytes stored for an [m, k] weight (padding and scales included)."""

    def unsupported_reason(self, m: int, k: int) -> str | None:
        """None when the weight GEMM takes an [m, k] weight in this format, else the broken constraint
        (the same phrase as the format's decode stage; tests hold the two together)."""
        if m % MMA_MULTIPLE or k % MMA_MULTIPLE:
            return f"M and K must be multiples of {MMA_MULTIPLE}"
        return None

    def roundtrip(self, w: np.ndarray) -> np.ndarray:
        """float32 unpack(pack(w)): the weight the compiled model computes with."""
        return self.unpack(self.pack(w))


@dataclass(frozen=True)
class DenseFormat(WeightFormat):
    """W stored as is, in `dtype` (identity for float32, a rounding to nearest for float16)."""

    name: str
    dtype: str
    compresses: ClassVar[bool] = False

    def pack(self, w: np.ndarray) -> PackedWeight:
        w = _check_weight(w)
        return PackedWeight(self.name, w.shape, {"weight": w.astype(self.dtype)})

    def unpack(self, packed: PackedWeight) -> np.ndarray:
        return packed.arrays["weight"].astype(np.float32)

    def stored_bytes(self, m: int, k: int) -> int:
        return m * k * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class DensePanelFormat(WeightFormat):
    """W in `dtype`, stored as [M/16, K, 16] column panels for the CPU micro-kernel (`dense_panel`)."""

    name: str
    dtype: str
    compresses: ClassVar[bool] = False

    def pack(self, w: np.ndarray) -> PackedWeight:
        w = _check_weight(w)
        return PackedWeight(self.name, w.shape, {"weight": dense_panel.pack_dense_panel(w, self.dtype)})

    def unpack(self, packed: PackedWeight) -> np.ndarray:
        return dense_panel.unpack_dense_panel(packed.arrays["weight"])

    def stored_bytes(self, m: int, k: int) -> int:
        return m * k * np.dtype(self.dtype).itemsize

    def unsupported_reason(self, m: int, k: int) -> str | None:
        if m % dense_panel.PANEL_WIDTH:
            return f"M must be a multiple of {dense_panel.PANEL_WIDTH}"
        return None


@dataclass(frozen=True)
class FPxFormat(WeightFormat):
    """eXmY codes in bit planes (`fpx_layout`) with one fp16 scale per output channel (`fpx`).

    scale_search: "absmax" (scale = absmax / max value) or "mse" (each channel's clip ratio from
    fpx.MSE_CLIP_RATIOS with the lowest squared error).
    """

    name: str
    ebits: int
    mbits: int
    scale_search: str = "absmax"

    def __post_init__(self):
        fpx.check_format(self.ebits, self.mbits)
        _check_scale_search(self.scale_search)

    @property
    def stage_name(self) -> str:
        """The canonical eXmY name, under which the decode stage and packed weights go."""
        return f"e{self.ebits}m{self.mbits}"

    def encode(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes uint8 [M, K], scales float16 [M]) with this format's scale search."""
        w = _check_weight(w)
        if self.scale_search == "mse":
            return fpx.encode_mse(w, self.ebits, self.mbits)
        return fpx.encode(w, self.ebits, self.mbits)

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

    def unsupported_reason(self, m: int, k: int) -> str | None:
        return fpx_layout.unsupported_shape_reason(m, k)

    def stored_bytes(self, m: int, k: int) -> int:
        bits = fpx.code_bits(self.ebits, self.mbits)
        planes = sum(fpx_layout.plane_words(m, k, p) * 4 for p in fpx_layout.plane_widths(bits))
        return planes + 2 * m


@dataclass(frozen=True)
class FPxAutoFormat(WeightFormat):
    """Per weight, the candidate eXmY (all of one bit width) with the lowest reconstruction error
    sum((W - decode(encode(W)))^2); ties go to the earlier candidate."""

    name: str
    candidates: tuple[tuple[int, int], ...]
    scale_search: str = "absmax"

    def __post_init__(self):
        _check_scale_search(self.scale_search)
        if len({fpx.code_bits(e, m) for e, m in self.candidates}) != 1:
            raise ConfigError(f"the candidates of {self.name} must all have the same number of bits.")

    def _formats(self) -> list[FPxFormat]:
        return [FPxFormat(f"e{e}m{m}", e, m, self.scale_search) for e, m in self.candidates]

    def _choose(self, w: np.ndarray) -> tuple[FPxFormat, np.ndarray, np.ndarray]:
        best = None
        for fmt in self._formats():
            codes, scales = fmt.encode(w)
            err = float(fpx.reconstruction_error(w, codes, scales, fmt.ebits, fmt.mbits).sum())
            if best is None or err < best[0]:
                best = (err, fmt, codes, scales)
        assert best is not None
        return best[1], best[2], best[3]

    def resolve(self, w: np.ndarray) -> FPxFormat:
        return self._choose(_check_weight(w))[0]

    def pack(self, w: np.ndarray) -> PackedWeight:
        fmt, codes, scales = self._choose(_check_weight(w))
        return fmt.pack_codes(codes, scales)

    def unpack(self, packed: PackedWeight) -> np.ndarray:
        for fmt in self._formats():
            if fmt.stage_name == packed.format:
                return fmt.unpack(packed)
        raise TensorpressError(f"{self.name} never stores a {packed.format} weight.")

    def unsupported_reason(self, m: int, k: int) -> str | None:
        return fpx_layout.unsupported_shape_reason(m, k)

    def stored_bytes(self, m: int, k: int) -> int:
        return self._formats()[0].stored_bytes(m, k)


def _build_registry() -> dict[str, WeightFormat]:
    formats: dict[str, WeightFormat] = {
        "dense-fp16": DenseFormat("dense-fp16", "float16"),
        "dense-fp32": DenseFormat("dense-fp32", "float32"),
        "dense-fp16-panel": DensePanelFormat("dense-fp16-panel", "float16"),
        "dense-fp32-panel": DensePanelFormat("dense-fp32-panel", "float32"),
    }
    for name, (ebits, mbits) in FPX_ALIASES.items():
        formats[name] = FPxFormat(name, ebits, mbits)
    for ebits in range(1, fpx.MAX_EXPONENT_BITS + 1):
        for mbits in range(fpx.MAX_CODE_BITS - ebits):
            formats[f"e{ebits}m{mbits}"] = FPxFormat(f"e{ebits}m{mbits}", ebits, mbits)
    formats["fp6-auto"] = FPxAutoFormat("fp6-auto", ((3, 2), (2, 3)))
    return formats


def weight_format_names() -> list[str]:
    """Every name `get_weight_format` accepts (the CLI's choices for --weights)."""
    return sorted(WEIGHT_FORMATS)


def get_weight_format(name: str, scale_search: str = "absmax") -> WeightFormat:
    """The registered format `name`, with `scale_search` applied where the format has scales.

    Raises ConfigError, listing the valid names, for an unknown name or scale search.
    """
    _check_scale_search(scale_search)
    fmt = WEIGHT_FORMATS.get(name)
    if fmt is None:
        raise ConfigError(f"unknown weight format {name!r}; valid formats: {', '.join(weight_format_names())}.")
    if isinstance(fmt, (FPxFormat, FPxAutoFormat)):
        return dataclasses.replace(fmt, scale_search=scale_search)
    return fmt


def _check_scale_search(scale_search: str) -> None:
    if scale_search not in SCALE_SEARCHES:
        raise ConfigError(f"unknown scale search {scale_search!r}; valid choices: {', '.join(SCALE_SEARCHES)}.")


def _check_weight(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype.kind != "f":
        raise TensorpressError(f"a weight to pack must be a 2-D float array [M, K], got {w.dtype} {w.shape}.")
    return w


WEIGHT_FORMATS: dict[str, WeightFormat] = _build_registry()
