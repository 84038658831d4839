"""How a tuning candidate is timed: one compiled kernel in an exported library, its arguments' shapes.

The search builds candidates here (the compiler is only needed for that) and hands them to a Measurer,
which runs them where they will run: `LocalMeasurer` in this process, an RPC measurer on the devices of a
TVM RPC tracker. Every measurer answers the same thing, the median seconds of one call per candidate, in
order, with `math.inf` for a candidate that failed to load or run (it is then never chosen).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class ArgSpec:
    """One argument of the kernel: a tensor of this concrete shape and dtype (symbolic extents bound)."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class BuiltCandidate:
    """One compiled kernel to time: `library` (an `export_library` output holding function `entry`),
    called with fresh tensors of `args`."""

    library: Path
    entry: str
    args: tuple[ArgSpec, ...]


@dataclass(frozen=True)
class TimingPlan:
    """How each candidate is timed (TVM's time_evaluator): `repeat` medians of calls that last at least
    `min_repeat_ms` together, after one warm-up call."""

    repeat: int = 5
    min_repeat_ms: int = 20


class Measurer(Protocol):
    """Times built candidates; the library suffix it loads (".so" here, ".tar" to link on a remote)."""

    library_suffix: str

    def measure(self, candidates: Sequence[BuiltCandidate]) -> list[float]:
        """Median seconds of one call for each candidate, in order; math.inf where it failed."""
        ...


def random_arguments(args: Sequence[ArgSpec], seed: int = 0) -> list[np.ndarray]:
    """Inputs a kernel can run on at full speed: floats in [-1, 1] (no denormals, no NaN), integers
    uniform over their type (packed codes, bitmaps)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in args:
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            arrays.append(rng.uniform(-1.0, 1.0, spec.shape).astype(dtype))
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            arrays.append(rng.integers(info.min, info.max, spec.shape, dtype=dtype, endpoint=True))
        elif dtype.kind == "b":
            arrays.append(rng.integers(0, 2, spec.shape).astype(dtype))
        else:
            raise ValueError(f"no random inputs for dtype {spec.dtype}")
    return arrays


class LocalMeasurer:
    """Times candidates on this machine's CPU, one after another (they would contend for the cores)."""

    library_suffix = ".so"

    def __init__(self, plan: TimingPlan | None = None):
        self.plan = plan or TimingPlan()

    def measure(self, candidates: Sequence[BuiltCandidate]) -> list[float]:
        return [self._measure_one(candidate) for candidate in candidates]

    def _measure_one(self, candidate: BuiltCandidate) -> float:
        import tvm

        try:
            module = tvm.runtime.load_module(str(candidate.library))
            device = tvm.cpu()
            tensors = [tvm.runtime.tensor(a, device) for a in random_arguments(candidate.args)]
            timer = module.time_evaluator(
                candidate.entry, device, repeat=self.plan.repeat, min_repeat_ms=self.plan.min_repeat_ms
            )
            return float(timer(*tensors).median)
        except Exception:  # noqa: BLE001 - a candidate that cannot run is a failed trial, never a crash
            return math.inf
