"""Storage formats, by kind and by the name the user gives: weights (`--weights fp6`) and the KV cache
(`--kv-cache-dtype int8`).

    fmt = get_weight_format("fp6", scale_search="mse")   # a WeightFormat (base.py)
    packed = fmt.pack(w)                 # PackedWeight: the arrays the artifact stores for W[M, K]
    w_hat = fmt.unpack(packed)           # float32 [M, K], the numpy reference of the kernel's decode
    stage = fmt.decode_stage()           # the TIR decode every kernel of this format uses
    kv = get_kv_cache_format("int8")     # a KVCacheFormat (kv_cache.py): cache tensors, append, read

`FORMATS[kind][name]` is the one registry (kind "weight" or "kv_cache"), in the style of MLC-LLM's
QUANTIZATION dict: the CLI's choices, the Python configs, the compile passes, the decoder definition and
the schedules all read it, and no other file names a format.

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

Adding a KV-cache format touches this folder only:
1. One file `kv_<name>.py` holding a `KVCacheFormat` subclass (`kv_cache.py`): `cache_tensors` (each
   page-major [L, "num_pages", 2, KVH, PS, ...]), `quantize` / `dequantize` (the numpy reference),
   `append_func` (the kv_append PrimFunc: an "append" block over (n, g, d), per-row blocks such as an
   absmax before it) and `read` (one dequantised element, in TIR).
2. One line in `FORMATS["kv_cache"]` below. `--kv-cache-dtype`, `KVCacheConfig`, the attention kernels,
   the manifest and the runtime pick it up.
3. Tests as tests/compiler/formats/test_kv_int8.py, tests/schedules/test_kv_attention_quantised.py and
   tests/runtime/test_decoder_kv_quantised.py do (`kv_int8.py` is the example).
A page-granular KV format (recent tokens full precision, whole pages quantised when they leave the
window) subclasses `PageQuantisedKVFormat` (`kv_page_quantised.py`) instead: its quantised tensors, the
numpy page reference, the quantise-pages kernel and the read of one quantised element; the full-precision
pool, the append, the tagged page read, the quantize_pages function and the runtime's policy come with
it (`kv_int2_kitty.py` is the example).
"""

from __future__ import annotations

from typing import Any

from tensorpress.compiler.formats.base import PackedWeight, WeightFormat
from tensorpress.compiler.formats.bitmap import BitmapFormat
from tensorpress.compiler.formats.bitmap_fpx import bitmap_fpx_formats
from tensorpress.compiler.formats.dense import DenseFormat
from tensorpress.compiler.formats.dense_column_panels import DensePanelFormat
from tensorpress.compiler.formats.ellpack import EllpackFormat
from tensorpress.compiler.formats.fpx import SCALE_SEARCHES, check_scale_search, fpx_formats
from tensorpress.compiler.formats.int8 import Int8WeightFormat
from tensorpress.compiler.formats.kv_cache import KVCacheFormat
from tensorpress.compiler.formats.kv_int2_kitty import Int2KittyKVCache
from tensorpress.compiler.formats.kv_int2_oscar import Int2OscarKVCache
from tensorpress.compiler.formats.kv_int4 import Int4KVCache
from tensorpress.compiler.formats.kv_int8 import Int8KVCache
from tensorpress.compiler.formats.kv_model_dtype import ModelDtypeKVCache
from tensorpress.compiler.formats.tiled_csl import TiledCSLFormat
from tensorpress.errors import ConfigError
from tensorpress.schedules.decode_stage import DecodeStage

WEIGHT = "weight"
KV_CACHE = "kv_cache"

FORMATS: dict[str, dict[str, Any]] = {
    WEIGHT: {
        "dense-fp16": DenseFormat("dense-fp16", "float16"),
        "dense-fp32": DenseFormat("dense-fp32", "float32"),
        "dense-fp16-panel": DensePanelFormat("dense-fp16-panel", "float16"),
        "dense-fp32-panel": DensePanelFormat("dense-fp32-panel", "float32"),
        **fpx_formats(),  # fp6, fp6_e2m3, fp5, fp4, every eXmY, fp6-auto
        "int8": Int8WeightFormat("int8"),
        "bitmap": BitmapFormat("bitmap"),  # unstructured sparse: a bitmask + the fp16 nonzeros per tile
        **bitmap_fpx_formats(),  # sparse x FPx: bitmap-e3m2, ...: the bitmask + FPx codes, a scale per row
        "ellpack": EllpackFormat("ellpack"),  # unstructured sparse for the CPU: (fp16 value, column) row slots
        "tiled-csl": TiledCSLFormat("tiled-csl"),  # unstructured sparse: (fp16 value | position) words per tile
    },
    KV_CACHE: {
        "auto": ModelDtypeKVCache("auto", None),  # the model's dtype
        "fp16": ModelDtypeKVCache("fp16", "float16"),
        "fp32": ModelDtypeKVCache("fp32", "float32"),
        "int8": Int8KVCache(),
        "int4": Int4KVCache(),  # asymmetric 4-bit, two codes a byte, fp16 min + scale per row
        "int2-kitty": Int2KittyKVCache(),  # 2-bit pages, boosted key channels; fp16 sink + window
        "int2-oscar": Int2OscarKVCache(),  # calibrated K/V rotations, per-token clipped 2-bit; fp16 sink + window
    },
}
WEIGHT_FORMATS: dict[str, WeightFormat] = FORMATS[WEIGHT]
KV_CACHE_FORMATS: dict[str, KVCacheFormat] = FORMATS[KV_CACHE]

# Names SparseConfig accepts for sparse formats that are planned, not built yet.
PLANNED_SPARSE_FORMATS: tuple[str, ...] = ()
# --sparse-format auto: per layer, the sparse format of the target (`WeightFormat.auto_targets`) that
# stores the fewest bytes, or the target's dense format when none stores fewer (`compiler/weight_plan.py`).
AUTO_SPARSE_FORMAT = "auto"


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


def sparse_format_choices() -> list[str]:
    """What --sparse-format and SparseConfig.format take: auto, the sparse formats, the planned ones."""
    return [AUTO_SPARSE_FORMAT, *sparse_weight_format_names(), *PLANNED_SPARSE_FORMATS]


def sparse_weight_format_names() -> list[str]:
    """The registered formats that store a weight's nonzeros (`WeightFormat.sparse`) in fp16: --sparse-format.
    (Their FPx twins, such as bitmap-e3m2, are what `sparse_format_with_values` finds for --weights fp6.)"""
    return sorted(name for name, fmt in WEIGHT_FORMATS.items() if fmt.sparse and fmt.sparse_values == "fp16")


def sparse_format_with_values(layout: str, values: str) -> str | None:
    """The registered sparse format of --sparse-format `layout` whose nonzeros are `values` ("fp16" or an
    eXmY name: sparse x FPx), or None where none is built."""
    for name, fmt in WEIGHT_FORMATS.items():
        if fmt.sparse and fmt.sparse_layout == layout and fmt.sparse_values == values:
            return name
    return None


def dense_weight_format(target_kind: str, act_dtype: str) -> str:
    """The dense weight format of a layer kept dense on `target_kind` ("cuda" or "cpu"): fp16 for the
    Tensor Cores; on the CPU, column panels the micro-kernel reads in place, in the activation dtype."""
    if target_kind == "cuda":
        return "dense-fp16"
    return "dense-fp16-panel" if act_dtype == "float16" else "dense-fp32-panel"


def decode_stage(name: str) -> DecodeStage:
    """The decode stage of the registered weight format `name` (what `PackedWeight.format` names)."""
    return get_weight_format(name).decode_stage()


def kv_cache_format_names() -> list[str]:
    """The names `--kv-cache-dtype` takes, in registry order ("auto" first)."""
    return list(KV_CACHE_FORMATS)


def get_kv_cache_format(name: str) -> KVCacheFormat:
    """The registered KV-cache format `name`; a ConfigError listing the valid names otherwise."""
    fmt = KV_CACHE_FORMATS.get(name)
    if fmt is None:
        raise ConfigError(f"unknown KV cache format {name!r}; valid names: {', '.join(kv_cache_format_names())}.")
    return fmt


__all__ = [
    "AUTO_SPARSE_FORMAT",
    "FORMATS",
    "KV_CACHE_FORMATS",
    "SCALE_SEARCHES",
    "WEIGHT_FORMATS",
    "KVCacheFormat",
    "PackedWeight",
    "WeightFormat",
    "decode_stage",
    "dense_weight_format",
    "get_kv_cache_format",
    "get_weight_format",
    "kv_cache_format_names",
    "sparse_format_choices",
    "sparse_format_with_values",
    "sparse_weight_format_names",
    "weight_format_names",
]
