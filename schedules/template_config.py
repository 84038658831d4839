"""How a template's schedule rule learns a tuned config, and how a scheduled kernel says which it used.

A template rule (the CPU weight GEMM, the Tensor Core weight GEMM) computes its default config, then
asks a `ConfigLookup` (given to the rule by the build; the compiler's tuning records implement it) for
a tuned one. The lookup hands back the config's parameters as they were recorded and where they came
from; the rule parses and validates them for this kernel and uses them only if they pass, else its
default. The kernel is scheduled from the PrimFunc stamped with what was used:

    tensorpress.template_config   JSON: {"template": ..., "config": {...}}
    tensorpress.config_origin     "default", or the tuning log the config came from

so the build can list per kernel the config and its origin (the artifact's manifest), whatever the
rule did on the way (a tuned config TVM cannot schedule falls back to the default).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from tvm import tirx

from tensorpress.schedules.weight_gemm import FORMAT_ATTR, KERNEL_ATTR, N_HINT_ATTR, weight_gemm_params

CONFIG_ATTR = "tensorpress.template_config"
CONFIG_ORIGIN_ATTR = "tensorpress.config_origin"
DEFAULT_ORIGIN = "default"

CPU_WEIGHT_GEMM = "cpu-weight-gemm"  # template names: records and manifests carry them
TENSORCORE_WEIGHT_GEMM = "tensorcore-weight-gemm"


class ConfigLookup(Protocol):
    """Tuned configs by kernel: the build gives one to the template rules."""

    def tuned(self, func: tirx.PrimFunc, template: str) -> tuple[dict[str, Any], str] | None:
        """(the recorded config parameters, where they came from) for this kernel of `template`, or None."""
        ...


def kernel_signature(func: tirx.PrimFunc) -> dict[str, Any]:
    """What identifies a template kernel for tuning, read from its PrimFunc: its kind, its decode format
    (name and stored buffers: names, shapes, dtypes), M, K, the token count it is built for (its n_hint,
    None when unknown) and the activation dtype."""
    attrs = func.attrs
    m, k = (int(v) for v in attrs["tensorpress.mk"])
    params = weight_gemm_params(func)
    # the stored buffers only: the epilogue's arguments (bias, residual) leave the tiling as it is
    buffers = [[buf.name, [int(d) for d in buf.shape], str(buf.dtype)] for buf in params.stored]
    return {
        "kind": str(attrs[KERNEL_ATTR]),
        "format": {"name": str(attrs[FORMAT_ATTR]), "buffers": buffers},
        "m": m,
        "k": k,
        "n": int(attrs[N_HINT_ATTR]) if N_HINT_ATTR in attrs else None,
        "act_dtype": str(params.x.dtype),
    }


def stamped(func: tirx.PrimFunc, template: str, config: dict[str, Any], origin: str) -> tirx.PrimFunc:
    """`func` carrying the config it is scheduled with and where that came from (module docstring)."""
    record = json.dumps({"template": template, "config": config}, sort_keys=True)
    return func.with_attrs({CONFIG_ATTR: record, CONFIG_ORIGIN_ATTR: origin})


def stamp_of(func: tirx.PrimFunc) -> dict[str, Any] | None:
    """{"template", "config", "origin"} of a stamped kernel, else None."""
    attrs = func.attrs
    if attrs is None or CONFIG_ATTR not in attrs:
        return None
    return {**json.loads(str(attrs[CONFIG_ATTR])), "origin": str(attrs[CONFIG_ORIGIN_ATTR])}
