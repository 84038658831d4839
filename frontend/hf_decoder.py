"""Hugging Face decoder folder -> ImportedModel(kind="decoder") with prefill/decode over a paged KV cache.

The folder is not traced: config.json names the architecture, we build our own definition of that
family (frontend/decoders/) and fill its parameters from the folder's *.safetensors under their
Hugging Face names. Linear layers export as `R.matmul(x, R.permute_dims(W))` (+ `R.add(.., bias)`)
with W a named parameter, so the compiler's weight-format pass treats them like any other model's.

    imported = import_hf_decoder("path/to/llama", dtype="float16")
    imported.mod          prefill / decode (see frontend/decoders/causal_lm.py for the signatures)
    imported.params       {hf name: numpy array}, in trailing-parameter order
    imported.info         {"decoder": manifest section for the runtime, "extra_files": {...}}

The KV-cache format is the compiler's choice, handed in as `kv_cache` (the frontend never names one).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tensorpress.errors import ModelImportError
from tensorpress.frontend.decoders.causal_lm import DECODE, PREFILL, QUANTIZE_PAGES, CausalLM
from tensorpress.frontend.decoders.decoder_config import (
    SUPPORTED_ARCHITECTURES,
    DecoderConfig,
    decoder_config_from_hf,
)
from tensorpress.frontend.decoders.paged_attention import KVCacheKernels, kv_rotations
from tensorpress.frontend.decoders.safetensors_reader import read_safetensors_folder
from tensorpress.imported_model import ImportedModel, TensorSpec

DEFAULT_PAGE_SIZE = 16
TOKENIZER_FILE = "tokenizer.json"
_DTYPES = ("float32", "float16")


def is_hf_decoder_folder(folder: str | Path) -> bool:
    """True when folder/config.json names an architecture this frontend defines."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return bool(archs) and archs[0] in SUPPORTED_ARCHITECTURES


def read_decoder_config(folder: str | Path) -> DecoderConfig:
    """The DecoderConfig of a Hugging Face folder (config.json + generation_config.json if present)."""
    folder = Path(folder)
    path = folder / "config.json"
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelImportError(f"{folder}: no config.json; expected a Hugging Face model folder.") from None
    except ValueError as err:
        raise ModelImportError(f"{path}: not valid JSON ({err}).") from None
    gen_path = folder / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    return decoder_config_from_hf(hf, generation, where=str(path))


def build_decoder_module(config: DecoderConfig, dtype: str, kv_cache: KVCacheKernels) -> CausalLM:
    """Our nn.Module for the config's family (parameters unset), its KV cache stored as `kv_cache` says."""
    module: CausalLM
    if config.family == "llama":
        from tensorpress.frontend.decoders.llama import LlamaForCausalLM

        module = LlamaForCausalLM(config, dtype)
    else:
        from tensorpress.frontend.decoders.opt import OPTForCausalLM

        module = OPTForCausalLM(config, dtype)
    module.kv_cache = kv_cache
    if getattr(kv_cache, "attention_rotations", False):  # params kv_rotations.{layer}.key / .value
        module.kv_rotations = kv_rotations(config.num_layers, config.num_kv_heads, config.head_dim, dtype)
    return module


def _default_dtype(folder: Path) -> str:
    hf = json.loads((folder / "config.json").read_text())
    stored = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return "float32" if stored == "float32" else "float16"


# Where a decoder's weights come from: {Hugging Face name: shape} of the weights the definition needs ->
# {name: array} (the checkpoint's own arrays; shapes are checked after). A folder's *.safetensors by default.
WeightSource = Callable[[dict[str, tuple[int, ...]]], dict[str, np.ndarray]]


def _load_params(
    named: list[tuple[str, Any]], tensors: dict[str, np.ndarray], dtype: str, where: str, source_words: str
) -> dict[str, np.ndarray]:
    params: dict[str, np.ndarray] = {}
    for name, param in named:
        if name not in tensors:
            raise ModelImportError(f"{where}: weight {name} is missing from {source_words}.")
        array = tensors[name]
        expected = tuple(int(s) for s in param.shape)
        if array.shape != expected:
            raise ModelImportError(
                f"{where}: weight {name} has shape {list(array.shape)}, but config.json implies {list(expected)}."
            )
        params[name] = np.ascontiguousarray(array.astype(dtype, copy=False))
    return params


def import_hf_decoder(
    folder: str | Path,
    dtype: str | None = None,
    *,
    kv_cache: KVCacheKernels,
    page_size: int = DEFAULT_PAGE_SIZE,
    shapes_only: bool = False,
    weight_source: WeightSource | None = None,
    source: str | None = None,
    kv_parameters: dict[str, np.ndarray] | None = None,
) -> ImportedModel:
    """Import a Llama/Qwen2/OPT causal-LM folder as prefill/decode functions over a paged KV cache.

    dtype: compute and weight dtype ("float32" or "float16"; default: float32 for float32
    checkpoints, else float16). kv_cache: the KV-cache format the compiler chose (its tensors and
    kernels; `compiler/formats/kv_cache.py`). page_size: tokens per KV page (fixed in the kernels).
    shapes_only: read config.json alone; the params are zero stand-ins of the right shapes that take
    no memory (for artifacts compiled with store_weights=False, whose weights come at load time).
    weight_source, source: where the weights come from instead of the folder's *.safetensors, and its
    name for messages (the ONNX decoder frontend passes the graph's initializers).
    kv_parameters: the parameters a KV format asks for beside the checkpoint's (int2-oscar's calibrated
    rotations, kv_rotations.{layer}.key / .value), made by the compiler.
    """
    folder = Path(folder)
    where = source or str(folder)
    config = read_decoder_config(folder)
    dtype = dtype or _default_dtype(folder)
    if dtype not in _DTYPES:
        supported = " or ".join(_DTYPES)
        raise ModelImportError(f"{where}: dtype {dtype!r} is not supported for decoders (use {supported}).")
    module = build_decoder_module(config, dtype, kv_cache)
    mod, named = module.export_tvm(spec=module.export_spec(page_size))
    if shapes_only:
        params = {name: np.broadcast_to(np.zeros((), dtype), tuple(int(d) for d in p.shape)) for name, p in named}
    elif weight_source is not None:
        needed = {name: tuple(int(d) for d in p.shape) for name, p in named}
        params = _load_params(named, weight_source(needed), dtype, where, "the model's weights")
    else:
        tensors = {**read_safetensors_folder(folder), **(kv_parameters or {})}
        params = _load_params(named, tensors, dtype, where, "the *.safetensors files")

    cache_tensors = module.cache_tensors(page_size)
    # learned position tables end; RoPE has no hard limit
    max_len = config.max_position_embeddings if config.position_encoding == "learned" else None
    tokenizer = folder / TOKENIZER_FILE
    decoder_info = {
        "config": config.to_dict(),
        "dtype": dtype,
        "page_size": page_size,
        # the tensors the runtime allocates, in the functions' order ("num_pages" is its choice)
        "cache_tensors": [t.to_dict() for t in cache_tensors],
        "bytes_per_token": kv_cache.bytes_per_token(config.num_layers, config.num_kv_heads, config.head_dim, dtype),
        "kv_cache": {"format": kv_cache.name, "bits": kv_cache.code_bits(dtype)},
        "functions": {"prefill": PREFILL, "decode": DECODE}
        | ({"quantize_pages": QUANTIZE_PAGES} if module.quantizes_pages() else {}),
        "max_sequence_length": max_len,
        "context_length": config.context_length(),  # the runtime refuses longer sequences unless asked
        "eos_token_ids": list(config.eos_token_ids),
        "bos_token_id": config.bos_token_id,
        "tokenizer": TOKENIZER_FILE if tokenizer.is_file() else None,
    }
    if module.quantizes_pages():  # sink, window and group: when the runtime quantises pages
        shape = (config.num_layers, config.num_kv_heads, config.head_dim, page_size, dtype)
        decoder_info["page_quantisation"] = kv_cache.page_quantisation(*shape).to_dict()  # type: ignore[attr-defined]
    info = {
        "architecture": config.architecture,
        "decoder": decoder_info,
        # files the artifact must carry beside the weights: {name in artifact: path on disk}
        "extra_files": {TOKENIZER_FILE: str(tokenizer)} if tokenizer.is_file() else {},
    }
    inputs = [
        TensorSpec("input_ids", ("n",), "int32"),
        TensorSpec("positions", ("n",), "int32"),
        TensorSpec("seq_slot", ("n",), "int32"),
        TensorSpec("block_table", ("b", "m"), "int32"),
        TensorSpec("last_token_index", ("b",), "int32"),
        *(TensorSpec(t.name, tuple(t.shape), t.dtype) for t in cache_tensors),
    ]
    outputs = [TensorSpec("logits", ("b", config.vocab_size), "float32")]
    return ImportedModel(
        mod=mod,
        params=params,
        inputs=inputs,
        outputs=outputs,
        kind="decoder",
        source=where,
        info=info,
    )
