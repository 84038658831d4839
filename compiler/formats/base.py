"""What every weight format is: a packer, its numpy reference, and the decode stage its kernels use.

    fmt = get_weight_format("fp6")       # a WeightFormat (compiler/formats/__init__.py: the registry)
    packed = fmt.pack(w)                 # PackedWeight: the arrays the artifact stores for W[M, K]
    w_hat = fmt.unpack(packed)           # float32 [M, K], the numpy reference of the kernel's decode
    stage = fmt.decode_stage()           # its TIR decode (schedules/decode_stage.py), read by every kernel

Pure numpy here, and so is every format file at import: their decode stages import TVM when first
used, so the registry (and `tensorpress compile --help`) loads without it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from tensorpress.errors import TensorpressError
from tensorpress.schedules.decode_stage import DecodeStage, StoredBuffer


@dataclass(frozen=True)
class PackedWeight:
    """A weight W[M, K] as stored: `arrays` (in the decode stage's order) read by the stage of the
    registered format `format` (for choosers such as fp6-auto, the format they chose)."""

    format: str
    shape: tuple[int, int]
    arrays: dict[str, np.ndarray] = field(compare=False)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())

    @property
    def buffers(self) -> list[StoredBuffer]:
        """The stored buffers without their values: what the weight's kernel is built for."""
        return [StoredBuffer(name, tuple(int(d) for d in a.shape), str(a.dtype)) for name, a in self.arrays.items()]


class WeightFormat(abc.ABC):
    """One registered weight format. Subclasses are frozen dataclasses with a `name` field."""

    name: str
    compresses: ClassVar[bool] = True  # False for the dense layouts (fp16 / fp32, plain or panels)
    sparse: ClassVar[bool] = False  # True: stores the nonzeros only (a weight is pruned before packing)
    targets: ClassVar[tuple[str, ...]] = ("cpu", "cuda")  # the target kinds with a kernel for it
    auto_targets: ClassVar[tuple[str, ...]] = ()  # sparse: where --sparse-format auto considers it

    @property
    def sparse_layout(self) -> str:
        """Sparse formats: the --sparse-format name of where the nonzeros go (bitmap for bitmap x FPx too)."""
        return self.name

    @property
    def sparse_values(self) -> str:
        """Sparse formats: what each stored nonzero is, "fp16" or an FPx eXmY name (sparse x FPx)."""
        return "fp16"

    def resolve(self, w: np.ndarray) -> WeightFormat:
        """The concrete format this weight is stored in (itself, except for choosers like fp6-auto)."""
        return self

    def with_scale_search(self, scale_search: str) -> WeightFormat:
        """This format with `scale_search` ("absmax", "mse", "act") where it has scales to search; else itself."""
        return self

    @abc.abstractmethod
    def pack(self, w: np.ndarray) -> PackedWeight:
        """Quantise float W[M, K] into the arrays the artifact stores."""

    def pack_calibrated(self, w: np.ndarray, gram: np.ndarray) -> PackedWeight:
        """`pack`, for a format that can use the layer's input Gram matrix X^T X [K, K] from calibration
        (FPx's act scale search); the others ignore it."""
        return self.pack(w)

    @abc.abstractmethod
    def unpack(self, packed: PackedWeight) -> np.ndarray:
        """float32 [M, K] rebuilt from `packed`, bit for bit what the kernel's decode gives in fp32."""

    @abc.abstractmethod
    def stored_bytes(self, m: int, k: int) -> int:
        """Bytes stored for an [m, k] weight (padding and scales included)."""

    def sparse_bytes(self, m: int, k: int, row_nonzeros: np.ndarray) -> int:
        """Sparse formats: the bytes stored for an [m, k] weight with these nonzero counts per row."""
        raise NotImplementedError(f"{self.name} is not a sparse format")

    @abc.abstractmethod
    def code_bits(self) -> int:
        """Bits one weight's code takes in storage (scales and padding not counted)."""

    @abc.abstractmethod
    def decode_stage(self) -> DecodeStage:
        """The TIR decode of the weights this format stores (for a chooser: of its first candidate)."""

    def unsupported_reason(self, m: int, k: int) -> str | None:
        """None when the weight GEMM takes an [m, k] weight in this format, else the broken constraint
        (one phrase): the decode stage's answer, so the plan and the kernels never disagree."""
        return self.decode_stage().unsupported_reason(m, k)

    def roundtrip(self, w: np.ndarray) -> np.ndarray:
        """float32 unpack(pack(w)): the weight the compiled model computes with."""
        return self.unpack(self.pack(w))


_FP16_MAX = float(np.finfo(np.float16).max)
_FP16_TINIEST = float(np.finfo(np.float16).smallest_subnormal)


def round_scales_to_fp16(ideal: np.ndarray) -> np.ndarray:
    """float16 per-row scales from float64 `ideal` ones, rounded to nearest (ties to even): a zero stays 0,
    a non-zero scale that would underflow fp16 gets its smallest subnormal, one that would overflow its
    largest finite value (the row's codes then saturate)."""
    with np.errstate(over="ignore"):
        scales = ideal.astype(np.float16)
    scales = np.where((ideal > 0) & (scales == 0), np.float16(_FP16_TINIEST), scales)
    return np.where(np.isinf(scales), np.float16(_FP16_MAX), scales).astype(np.float16)


def check_weight(w: np.ndarray) -> np.ndarray:
    """`w` as an array, or TensorpressError unless it is a 2-D float weight [M, K]."""
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype.kind != "f":
        raise TensorpressError(f"a weight to pack must be a 2-D float array [M, K], got {w.dtype} {w.shape}.")
    return w
