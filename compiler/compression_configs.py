"""Compression configs the user passes to `tensorpress.compile` (torchao style: plain, serialisable).

    tensorpress.compile(model, weights=FPxConfig(ebits=3, mbits=2, scale_search="mse", skip=("*.fc2",)))

Each config validates itself when built (a bad value raises ConfigError, saying which field and what
is allowed) and round-trips through `to_dict()` / `config_from_dict()`, which is how the artifact's
manifest stores it as written. `implemented` says whether `compile` can carry the config out yet; the
sparse config is accepted by the API and rejected by compile until its issue lands.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from tensorpress.compiler.formats import (
    AUTO_SPARSE_FORMAT,
    SCALE_SEARCHES,
    WEIGHT_FORMATS,
    get_kv_cache_format,
    kv_cache_format_names,
    sparse_format_choices,
)
from tensorpress.compiler.formats import fpx_codes as fpx
from tensorpress.compiler.formats.fpx import FPxFormat
from tensorpress.compiler.formats.kv_cache import KVCacheFormat
from tensorpress.compiler.pruning import PRUNE_METHODS
from tensorpress.errors import ConfigError


class _Config:
    """to_dict / from_dict shared by the configs: {"kind": KIND, field: value, ...}, JSON-friendly."""

    kind: ClassVar[str]
    implemented: ClassVar[bool]

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = dict(data)
        kind = data.pop("kind", cls.kind)
        if kind != cls.kind:
            raise ConfigError(f"a {kind!r} config cannot be read as {cls.__name__} (kind {cls.kind!r}).")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field {', '.join(unknown)}; fields: {', '.join(sorted(names))}.")
        return cls(**data)


@dataclass(frozen=True)
class FPxConfig(_Config):
    """FPx weights (FP6-LLM): eXmY codes, one fp16 scale per output channel.

    ebits, mbits: exponent and mantissa bits (e3m2 = FP6 default, e2m3, e2m2 = FP5, e2m1 = FP4, ...).
    scale_search: "absmax" (absmax / max value, the default), "mse" (per-channel clip search on the
        weight error) or "act" (on the layer's output error over compile's `calibration`).
    skip: name patterns (fnmatch) of linear layers to keep dense, on top of the default filter.
    """

    ebits: int = 3
    mbits: int = 2
    scale_search: str = "absmax"
    skip: tuple[str, ...] = ()

    kind: ClassVar[str] = "fpx"
    implemented: ClassVar[bool] = True

    def __post_init__(self):
        if isinstance(self.ebits, bool) or isinstance(self.mbits, bool):
            raise ConfigError("FPxConfig ebits and mbits must be integers, not booleans.")
        fpx.check_format(self.ebits, self.mbits)
        if self.scale_search not in SCALE_SEARCHES:
            raise ConfigError(
                f"FPxConfig scale_search must be one of {', '.join(SCALE_SEARCHES)}, got {self.scale_search!r}."
            )
        if isinstance(self.skip, str) or not isinstance(self.skip, Sequence):
            raise ConfigError(f"FPxConfig skip takes a list of name patterns, got {self.skip!r}.")
        if not all(isinstance(p, str) for p in self.skip):
            raise ConfigError(f"FPxConfig skip patterns must be strings, got {list(self.skip)!r}.")
        object.__setattr__(self, "skip", tuple(self.skip))

    @classmethod
    def from_format_name(cls, name: str, scale_search: str = "absmax", skip: Sequence[str] = ()) -> FPxConfig:
        """The config of a registered FPx name ("fp6", "fp5", "e2m3", ...)."""
        fmt = WEIGHT_FORMATS.get(name)
        if not isinstance(fmt, FPxFormat):
            valid = ", ".join(n for n, f in sorted(WEIGHT_FORMATS.items()) if isinstance(f, FPxFormat))
            raise ConfigError(f"{name!r} is not an FPx format name; valid names: {valid}.")
        return cls(fmt.ebits, fmt.mbits, scale_search, tuple(skip))

    @property
    def format_name(self) -> str:
        """The canonical eXmY name, e.g. "e3m2"."""
        return f"e{self.ebits}m{self.mbits}"

    def weight_format(self) -> FPxFormat:
        """The registry's format for this config (packs and unpacks weights)."""
        return FPxFormat(self.format_name, self.ebits, self.mbits, self.scale_search)


@dataclass(frozen=True)
class SparseConfig(_Config):
    """Unstructured-sparse weights: prune each linear weight to `sparsity`, store it in a sparse format.

    sparsity: fraction of zeros, 0 <= sparsity < 1.
    format: "auto" (per layer, the target's sparse format storing the fewest bytes: ellpack on CPUs,
        bitmap or tiled-csl on GPUs; dense where none saves bytes) or a registered sparse weight format
        ("ellpack", "bitmap", "tiled-csl").
    prune: "magnitude" (per output row, keep the largest |w|), "wanda" (|w| x the input channel's norm),
        "sparsegpt" (pruned and corrected from the layer's Hessian, the kept weights then refitted by
        exact least squares per row: the best quality, but ~20x the sweep's time, 8 minutes for one
        4096 x 4096 layer on 2 cores) or "sparsegpt-sweep" (the paper's OBS sweep alone: 25 s for
        such a layer), these three with compile's `calibration`; or "none" (the weights as
        given). See compiler/pruning.py.
    With an FPxConfig (sparse x FPx) the nonzeros are stored as FPx codes with the per-row scale
    (format "bitmap" or "auto": bitmap-eXmY where it stores fewer bytes than plain FPx, on GPUs).
    """

    sparsity: float
    format: str = AUTO_SPARSE_FORMAT
    prune: str = "magnitude"

    kind: ClassVar[str] = "sparse"
    implemented: ClassVar[bool] = True

    def __post_init__(self):
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ConfigError(f"SparseConfig sparsity must be a number in [0, 1), got {self.sparsity!r}.")
        if not 0 <= self.sparsity < 1:
            raise ConfigError(f"SparseConfig sparsity must be in [0, 1), got {self.sparsity}.")
        object.__setattr__(self, "sparsity", float(self.sparsity))
        formats = sparse_format_choices()
        if self.format not in formats:
            raise ConfigError(f"SparseConfig format must be one of {', '.join(formats)}, got {self.format!r}.")
        if self.prune not in PRUNE_METHODS:
            raise ConfigError(f"SparseConfig prune must be one of {', '.join(PRUNE_METHODS)}, got {self.prune!r}.")


@dataclass(frozen=True)
class KVCacheConfig(_Config):
    """How a decoder's KV cache is stored: a registered KV-cache format name (`compiler/formats/`):
    "auto" (the model's dtype, the default), "fp16", "fp32", "int8" (per-token, per-head scale), "int4"
    (per-token, per-head min and scale), "int2-kitty" (2-bit pages, `kv_int2_kitty.py`) or "int2-oscar"
    (calibrated rotations, per-token clipped 2-bit, `kv_int2_oscar.py`; compile needs `calibration`).

    The options of a page-granular format (None: the format's default): boost_fraction (int2-kitty: key
    channels at 4 bits, 0, 0.125 or 0.25), sink and window (tokens kept full precision at the start and
    at the end of each sequence), page_tokens (tokens of one quantised page), int8_query (int2-kitty and
    int2-oscar on a CPU target: q·k over 2-bit pages as integer dot products with q rounded to int8 per
    token and head, like llama.cpp's q8 dot products; the scores move by the query's rounding, far less
    than by the keys' 2 bits: on the demo model the held-out perplexity moved by 0.002 of 32.4 and the
    greedy tokens not at all. None (the default): where it is faster, head_dim 64 or a multiple of 128
    (4-21% at 32k); True: any head_dim a multiple of 16; False: q·k in fp32;
    `schedules/cpu/int8_query_scores.py`).
    """

    format: str = "auto"
    boost_fraction: float | None = None
    sink: int | None = None
    window: int | None = None
    page_tokens: int | None = None
    int8_query: bool | None = None

    kind: ClassVar[str] = "kv_cache"
    implemented: ClassVar[bool] = True

    def __post_init__(self):
        if self.format not in kv_cache_format_names():
            raise ConfigError(
                f"KVCacheConfig format must be one of {', '.join(kv_cache_format_names())}, got {self.format!r}."
            )
        self.kv_cache_format()  # a bad option of the format is refused here, in one sentence

    def kv_cache_format(self) -> KVCacheFormat:
        """The registry's format for this config, with its options set."""
        fmt = get_kv_cache_format(self.format)
        options = {k: getattr(self, k) for k in ("boost_fraction", "sink", "window", "page_tokens", "int8_query")}
        given = sorted(k for k, v in options.items() if v is not None)
        if not given:
            return fmt
        if not hasattr(fmt, "with_options"):
            raise ConfigError(
                f"KVCacheConfig {', '.join(given)} applies to page-granular formats, not {self.format!r}."
            )
        return fmt.with_options(**options)


CONFIG_KINDS: dict[str, type[_Config]] = {c.kind: c for c in (FPxConfig, SparseConfig, KVCacheConfig)}


def config_from_dict(data: dict[str, Any]) -> FPxConfig | SparseConfig | KVCacheConfig:
    """Rebuild any config from its `to_dict()` (dispatching on "kind")."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in CONFIG_KINDS:
        raise ConfigError(f"unknown config kind {kind!r}; valid kinds: {', '.join(CONFIG_KINDS)}.")
    return CONFIG_KINDS[kind].from_dict(data)
