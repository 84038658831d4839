"""Storage formats, by the name the user gives: weights (`--weights fp6`) and the KV cache.

    fmt = get_weight_format("fp6", scale_search="mse")   # a WeightFormat (base.py)
    packed = fmt.pack(w)                 # PackedWeight: the arrays the artifact stores for W[M, K]
    w_hat = fmt.unpack(packed)           # float32 [M, K], the numpy reference of the kernel's decode
    stage = fmt.decode_stage()           # the TIR decode every kernel of this format uses

`FORMATS[kind][name]` is the one registry (kind "weight" or "kv_cache"), in the style of MLC-LLM's
QUANTIZATION dict: the CLI's choices, the Python configs, the compile passes and the schedules all
read it, and no other file names a format.

Adding a weight format touches this folder only:
1. One file `<name>.py` holding all of it: a frozen dataclass subclass of `WeightFormat` (`pack`: float
   W[M, K] -> PackedWeight arrays; `unpack`: the numpy reference, bit for bit what the kernel decodes;
   `stored_bytes`; `decode_stage()`), and its `DecodeStage` (`schedules/decode_stage.py`): `decode`,
   the TIR expression of W[m, k] from the stored buffers, plus whichever capabilities it offers (row
   scale, shared staging, fragment decode, CPU panels, CPU word order). Import TVM inside the TIR
   methods only, so this registry imports without TVM. Draw the stored layout in the docstring.
2. One line in `FORMATS["weight"]` below. `tensorpress compile --weights <name>` and
   `tensorpress.compile(..., weights="<name>")` take it from there: the plan stores each linear layer
   in it (or keeps it dense where `unsupported_reason` says the kernel cannot take the shape), the
   rewrite builds a weight GEMM on its decode stage, and the Tensor Core template and the CPU rules
   schedule it by asking the stage what it can do.
3. Tests beside the others (tests/compiler/formats/test_<name>.py): pack/unpack against an independent
   numpy or torch reference, the decode stage built for llvm equal to `unpack` bit for bit, the CUDA
   schedule compiled (SASS) and replayed on the CPU (`int8.py` and its tests are the smallest example).
"""

from __future__ import annotations

from tensorpress.compiler.formats.base import PackedWeight, WeightFormat
from tensorpress.compiler.formats.dense import DenseFormat
from tensorpress.compiler.formats.dense_column_panels import DensePanelFormat
from tensorpress.compiler.formats.fpx import SCALE_SEARCHES, check_scale_search, fpx_formats
from tensorpress.compiler.formats.int8 import Int8WeightFormat
from tensorpress.errors import ConfigError
from tensorpress.schedules.decode_stage import DecodeStage

FORMATS: dict[str, dict[str, WeightFormat]] = {
    "weight": {
        "dense-fp16": DenseFormat("dense-fp16", "float16"),
        "dense-fp32": DenseFormat("dense-fp32", "float32"),
        "dense-fp16-panel": DensePanelFormat("dense-fp16-panel", "float16"),
        "dense-fp32-panel": DensePanelFormat("dense-fp32-panel", "float32"),
        **fpx_formats(),  # fp6, fp6_e2m3, fp5, fp4, every eXmY, fp6-auto
        "int8": Int8WeightFormat("int8"),
    },
}
WEIGHT_FORMATS = FORMATS["weight"]

# Names the configs accept for features whose formats are planned, not built (SparseConfig).
PLANNED_SPARSE_FORMATS = ("tiled-csl", "bitmap")


def weight_format_names() -> list[str]:
    """Every name `get_weight_format` accepts (the CLI's choices for --weights)."""
    return sorted(WEIGHT_FORMATS)


def get_weight_format(name: str, scale_search: str = "absmax") -> WeightFormat:
    """The registered weight format `name`, with `scale_search` applied where the format has scales.

    Raises ConfigError, listing the valid names, for an unknown name or scale search.
    """
    check_scale_search(scale_search)
    fmt = WEIGHT_FORMATS.get(name)
    if fmt is None:
        raise ConfigError(f"unknown weight format {name!r}; valid formats: {', '.join(weight_format_names())}.")
    return fmt.with_scale_search(scale_search)


def decode_stage(name: str) -> DecodeStage:
    """The decode stage of the registered weight format `name` (what `PackedWeight.format` names)."""
    return get_weight_format(name).decode_stage()


__all__ = [
    "FORMATS",
    "SCALE_SEARCHES",
    "WEIGHT_FORMATS",
    "PackedWeight",
    "WeightFormat",
    "decode_stage",
    "get_weight_format",
    "weight_format_names",
]
