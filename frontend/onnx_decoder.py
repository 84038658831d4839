"""ONNX decoders exported with past_key_values -> the prefill/decode functions of `hf_decoder`.

An ONNX causal LM exported from transformers (optimum, or torch.onnx.export of the model and its
cache) carries the KV cache through the graph as inputs `past_key_values.{i}.key / .value` and outputs
`present.{i}.key / .value`, and computes attention with ops that know nothing of pages. Its attention
is therefore not compiled as it stands: the graph is recognised as a cached decoder (one K/V input and
output pair per layer, head count and size matching the config.json beside it), the architecture
comes from that config, and the weights are lifted out of the graph under their Hugging Face names:

    initializer named after its module              m.model.layers.0.input_layernorm.weight
    MatMul(x, B) in scope /…/self_attn/q_proj        q_proj.weight = Bᵀ (B an initializer [K, M],
                                                     or Transpose(W) of an initializer W [M, K])
    Gemm(x, B, C) in a scope                         B (transB = 1) or Bᵀ, and C as the bias
    Add(y, b) in the same scope                      q_proj.bias = b (b an initializer [M])

A candidate name loses leading components (a wrapper module's `m.`) until it is the tail of exactly
one weight the definition needs, with the right shape. From there on the path is the Hugging Face decoder's: our own
definition of the family over our paged KV cache, and everything the weight formats add applies.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import numpy as np

from tensorpress.errors import ModelImportError
from tensorpress.imported_model import ImportedModel

PAST_INPUT = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
PRESENT_OUTPUT = re.compile(r"present\.(\d+)\.(key|value)$")


def is_onnx_decoder(path: str | Path) -> bool:
    """True when the ONNX file's graph takes `past_key_values.{i}.key/value` inputs (a cached decoder)."""
    stat = Path(path).stat()
    return _graph_has_past_inputs(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _graph_has_past_inputs(path: str, mtime_ns: int, size: int) -> bool:
    """(Cached per file version: compile asks before importing, the importer asks again.)"""
    import onnx

    try:
        graph = onnx.load(path, load_external_data=False).graph
    except Exception:  # not readable as ONNX: the plain importer reports it
        return False
    return any(PAST_INPUT.match(i.name) for i in graph.input)


def import_onnx_decoder(path: str | Path, dtype: str | None = None, **decoder_options: Any) -> ImportedModel:
    """Import a cached ONNX decoder (see the module docstring); config.json must sit beside the file."""
    from tensorpress.frontend.hf_decoder import import_hf_decoder, read_decoder_config

    path = Path(path)
    if not (path.parent / "config.json").is_file():
        raise ModelImportError(
            f"{path}: an ONNX decoder needs the config.json of its model beside it (optimum and "
            "save_pretrained write one); copy it into that folder."
        )
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph  # external weights stay on disk (mapped)
    config = read_decoder_config(path.parent)
    _check_cache_signature(graph, config, path)
    weights = _weight_candidates(graph, path.parent)
    float_types = {str(a.dtype) for a in weights.values() if a.dtype.kind == "f"}
    dtype = dtype or ("float32" if float_types <= {"float32"} else "float16")

    def from_graph(needed: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        found = _match_names(weights, needed)
        missing = [name for name in needed if name not in found]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise ModelImportError(
                f"{path}: cannot find the weights {shown} in the graph (matched by initializer names and the "
                "module scopes of MatMul/Gemm/Add nodes); export with torch.onnx or optimum, which keep both."
            )
        return found

    return import_hf_decoder(path.parent, dtype=dtype, weight_source=from_graph, source=str(path), **decoder_options)


def _check_cache_signature(graph, config, path: Path) -> None:
    """One past K/V input and one present K/V output per layer, [batch, kv heads, tokens, head dim]."""
    past = {m.groups(): i for i in graph.input if (m := PAST_INPUT.match(i.name))}
    present = {m.groups() for o in graph.output if (m := PRESENT_OUTPUT.match(o.name))}
    layers = {int(layer) for layer, _ in past}
    expected = set(range(config.num_layers))
    if layers != expected or len(past) != 2 * config.num_layers:
        raise ModelImportError(
            f"{path}: the graph's past_key_values inputs cover layers {sorted(layers)}, but config.json has "
            f"{config.num_layers} layers; export the model with its whole KV cache."
        )
    if present and present != set(past):
        raise ModelImportError(f"{path}: the graph's present.* outputs do not match its past_key_values inputs.")
    want = (config.num_kv_heads, config.head_dim)
    for (layer, kind), value in past.items():
        dims = value.type.tensor_type.shape.dim
        static = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        if len(static) != 4 or any(s is not None and s != w for s, w in zip((static[1], static[3]), want)):
            raise ModelImportError(
                f"{path}: input past_key_values.{layer}.{kind} has shape {static}, but config.json implies "
                f"[batch, {want[0]}, tokens, {want[1]}]."
            )


def _weight_candidates(graph, folder: Path) -> dict[str, np.ndarray]:
    """{candidate dotted name: array}: initializers by name, linear weights and biases by node scope."""
    tensors = {t.name: t for t in graph.initializer}
    # torch.onnx keeps one copy of initializers with equal values and turns the others into
    # Identity(first): the Identity's output carries the duplicate's name (norms at 1, biases at 0).
    inits = dict(tensors)
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        source = inits[name].name
        if source not in arrays:
            arrays[source] = _tensor_array(inits[name], folder)
        return arrays[source]

    candidates = {name: array(name) for name in inits if not name.startswith("onnx::")}
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        scope = _scope(node.name)
        if scope is None:
            continue
        if node.op_type == "MatMul" and len(node.input) == 2:
            weight = _constant_matrix(node.input[1], inits, producers, array)
            if weight is not None:
                candidates.setdefault(f"{scope}.weight", weight)
        elif node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in inits:
            attrs = {a.name: a for a in node.attribute}
            if ("alpha" in attrs and attrs["alpha"].f != 1.0) or ("transA" in attrs and attrs["transA"].i):
                continue  # a scaled or transposed-input Gemm is not a plain linear layer
            trans_b = attrs["transB"].i if "transB" in attrs else 0
            b = array(node.input[1])
            candidates.setdefault(f"{scope}.weight", b if trans_b else b.T)
            if len(node.input) == 3 and node.input[2] in inits:
                candidates.setdefault(f"{scope}.bias", array(node.input[2]))
        elif node.op_type == "Add":
            biases = [name for name in node.input if name in inits and len(inits[name].dims) == 1]
            if len(biases) == 1:
                candidates.setdefault(f"{scope}.bias", array(biases[0]))
    return candidates


def _tensor_array(tensor, folder: Path) -> np.ndarray:
    """An initializer's values; external data (models over 2 GB keep their weights in a side file) is
    mapped from that file rather than read into memory."""
    from onnx import TensorProto, helper, numpy_helper

    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {entry.key: entry.value for entry in tensor.external_data}
    bf16 = tensor.data_type == TensorProto.BFLOAT16
    dtype = np.dtype(np.uint16) if bf16 else helper.tensor_dtype_to_np_dtype(tensor.data_type)
    shape = tuple(int(d) for d in tensor.dims)
    array = np.memmap(folder / info["location"], dtype, mode="r", offset=int(info.get("offset", 0)), shape=shape)
    return (array.astype(np.uint32) << 16).view(np.float32) if bf16 else array


def _constant_matrix(name: str, inits, producers, array) -> np.ndarray | None:
    """W [M, K] of a MatMul's B input: an initializer [K, M], or Transpose(perm 1,0) of one [M, K]."""
    if name in inits and len(inits[name].dims) == 2:
        return array(name).T
    node = producers.get(name)
    if node is not None and node.op_type == "Transpose" and node.input[0] in inits:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if perm == [1, 0] and len(inits[node.input[0]].dims) == 2:
            return array(node.input[0])
    return None


def _scope(node_name: str) -> str | None:
    """`/m/model/layers.0/self_attn/q_proj/MatMul` -> `m.model.layers.0.self_attn.q_proj`."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1]) if len(parts) >= 2 else None


def _match_names(candidates: dict[str, np.ndarray], needed: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Each needed weight from the first candidate whose name, less some leading components, is the
    tail of exactly one needed name with its shape (`m.decoder.layers.0.fc1.weight` is
    `model.decoder.layers.0.fc1.weight`: TorchScript scopes skip a module whose forward is bypassed)."""
    tails: dict[str, list[str]] = {}
    for name in needed:
        parts = name.split(".")
        for start in range(len(parts)):
            tails.setdefault(".".join(parts[start:]), []).append(name)
    found: dict[str, np.ndarray] = {}
    for name, value in candidates.items():
        parts = name.split(".")
        for start in range(len(parts)):
            owners = tails.get(".".join(parts[start:]), [])
            if len(owners) == 1:
                owner = owners[0]
                if owner not in found and tuple(value.shape) == needed[owner]:
                    found[owner] = value
                break
    return found
