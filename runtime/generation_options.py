"""The checks of every generation parameter, in one place: `DecoderModel.generate` and the CLI's
`tensorpress generate` both call `check_generation_options` before any work, so a bad value is one
sentence (an `InputError`) naming the parameter, never a silent fallback (a negative temperature
running greedy, 2.5 new tokens becoming 3) or a bare assertion deep in sampling.

Imports only numpy and tensorpress.errors: it runs in a runtime-only bundle.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensorpress.errors import InputError


@dataclass(frozen=True)
class GenerationOptions:
    """Checked generation parameters (see `DecoderModel.generate` for their meaning)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    stop_ids: tuple[int, ...] | None
    seed: int | None
    allow_beyond_context: bool


def _integer(value: Any, name: str, minimum: int) -> int:
    # bool is an int in Python, but `max_new_tokens=True` is a mistake, not 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be a whole number, got {value!r} ({type(value).__name__}).")
    if int(value) < minimum:
        raise InputError(f"{name} must be at least {minimum}, got {int(value)}.")
    return int(value)


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    number = float(value)
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {number}.")
    return number


def check_generation_options(
    max_new_tokens: Any = 32,
    temperature: Any = 0.0,
    top_p: Any = 1.0,
    stop_ids: Any = None,
    seed: Any = None,
    allow_beyond_context: Any = False,
) -> GenerationOptions:
    """The parameters of a generate call, checked; raises InputError with one sentence for a bad one.

    max_new_tokens: a whole number >= 0. temperature: finite, >= 0 (0 = greedy). top_p: in (0, 1].
    stop_ids: None or whole numbers >= 0. seed: None or a whole number >= 0. allow_beyond_context: bool.
    """
    new_tokens = _integer(max_new_tokens, "max_new_tokens", 0)
    temp = _real(temperature, "temperature")
    if temp < 0:
        raise InputError(f"temperature must be 0 (greedy) or positive, got {temp}.")
    p = _real(top_p, "top_p")
    if not 0.0 < p <= 1.0:
        raise InputError(f"top_p must be in (0, 1] (1 keeps every token), got {p}.")
    stops = None
    if stop_ids is not None:
        if isinstance(stop_ids, str | bytes) or not isinstance(stop_ids, Sequence | np.ndarray):
            raise InputError(f"stop_ids must be a list of token ids, got {type(stop_ids).__name__}.")
        stops = tuple(_integer(t, "each of stop_ids", 0) for t in np.asarray(stop_ids, dtype=object).ravel())
    checked_seed = None if seed is None else _integer(seed, "seed", 0)
    if not isinstance(allow_beyond_context, bool | np.bool_):
        raise InputError(f"allow_beyond_context must be True or False, got {allow_beyond_context!r}.")
    return GenerationOptions(new_tokens, temp, p, stops, checked_seed, bool(allow_beyond_context))


def check_prompt_ids(prompt: Any, index: int) -> list[int]:
    """A prompt of token ids (a flat sequence or a 1-D array of whole numbers) as a list; raises
    InputError when it is empty, not flat, or holds anything but whole numbers >= 0."""
    array = np.asarray(prompt, dtype=object) if not isinstance(prompt, np.ndarray) else prompt
    if array.ndim != 1:
        raise InputError(f"prompt {index} must be a flat list of token ids, got {array.ndim} dimensions.")
    if array.size == 0:
        raise InputError(f"prompt {index} is empty; give at least one token id.")
    if array.dtype.kind not in "iu":
        bad = [t for t in array.tolist() if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
        if bad:
            raise InputError(f"prompt {index} holds {bad[0]!r}, which is not a token id (a whole number).")
    ids = [int(t) for t in array.tolist()]
    if min(ids) < 0:
        raise InputError(f"prompt {index} holds the negative token id {min(ids)}.")
    return ids
