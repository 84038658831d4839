"""Storage formats by kind and by the name the user gives.

KV-cache formats (`--kv-cache-dtype NAME`, `KVCacheConfig(NAME)`): one file each, a `KVCacheFormat`
(`kv_cache.py`), registered below. "auto" keeps the cache in the model's dtype.
"""

from __future__ import annotations

from tensorpress.compiler.formats.kv_cache import KVCacheFormat
from tensorpress.compiler.formats.kv_int8 import Int8KVCache
from tensorpress.compiler.formats.kv_model_dtype import ModelDtypeKVCache
from tensorpress.errors import ConfigError

KV_CACHE = "kv_cache"

FORMATS: dict[str, dict[str, KVCacheFormat]] = {
    KV_CACHE: {
        "auto": ModelDtypeKVCache("auto", None),
        "fp16": ModelDtypeKVCache("fp16", "float16"),
        "fp32": ModelDtypeKVCache("fp32", "float32"),
        "int8": Int8KVCache(),
    },
}


def kv_cache_format_names() -> list[str]:
    """The names `--kv-cache-dtype` takes, in registry order ("auto" first)."""
    return list(FORMATS[KV_CACHE])


def get_kv_cache_format(name: str) -> KVCacheFormat:
    """The registered KV-cache format `name`; a ConfigError listing the valid names otherwise."""
    fmt = FORMATS[KV_CACHE].get(name)
    if fmt is None:
        raise ConfigError(f"unknown KV cache format {name!r}; valid names: {', '.join(kv_cache_format_names())}.")
    return fmt
