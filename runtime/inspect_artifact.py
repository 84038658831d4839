"""`tensorpress inspect`: an artifact's manifest in words (what it was built from and for, its
signature, each linear layer's format and the bytes it saves) and the functions its library holds."""

from __future__ import annotations

import json
import os
import re
import shutil
import textwrap

from tensorpress.runtime.artifact import LIBRARY, ArtifactFile, open_artifact
from tensorpress.runtime.library_functions import exported_functions


def describe_artifact(path: str | os.PathLike, as_json: bool = False, verify: bool = True) -> str:
    artifact = open_artifact(path, verify=verify)
    m = artifact.manifest
    if as_json:
        return json.dumps(m, indent=1)
    from tensorpress.runtime.loaded_artifact import check_manifest  # crafted fields: one sentence, not a KeyError

    check_manifest(m, artifact.path)
    target = m["target"]
    lines = [
        f"{artifact.path}: tensorpress artifact v{m['format_version']} ({m.get('kind', 'graph')})",
        f"  built by tensorpress {m['versions']['tensorpress']}, TVM {m['versions']['tvm']} "
        + (f"on {m['created']} " if m.get("created") else "")
        + f"from {m.get('source', '?')}",
        f"  target: {target['kind']}{':' + target['arch'] if target.get('arch') else ''}, "
        f"dtype {m.get('recipe', {}).get('dtype', '?')}, weights {_recipe_words(m.get('recipe', {}))}",
        "  parts: " + ", ".join(f"{name} {p['bytes'] / 1e6:.2f} MB" for name, p in m["parts"].items()),
        "  inputs:  " + ", ".join(_tensor(t) for t in m.get("inputs", [])),
        "  outputs: " + ", ".join(_tensor(t) for t in m.get("outputs", [])),
    ]
    for name, fn in m.get("functions", {}).items():
        lines.append(f"  function {name}: {fn['num_input']} inputs, {len(fn['params'])} weights")
    decoder = m.get("decoder", (m.get("info") or {}).get("decoder"))
    if m.get("kind") == "decoder" and isinstance(decoder, dict):
        lines.append(_kv_cache_line(decoder))
    layers = m.get("layers", [])
    if layers:
        width = max(len("weight"), *(len(layer["weight"]) for layer in layers))
        formats = [_format_shown(layer) for layer in layers]
        fwidth = max(11, *(len(f) for f in formats))
        sparse = any("density" in layer for layer in layers)  # pruned or stored sparse: a density column
        lines.append(f"  linear layers ({len(layers)}):")
        lines.append(
            f"    {'weight'.ljust(width)}  {'shape':>12}  {'format'.ljust(fwidth)} "
            + (f"{'density':>8} " if sparse else "")
            + f"{'stored':>10} {'fp16':>10}  saved"
        )
        for layer, shown in zip(layers, formats):
            shape = "x".join(str(d) for d in layer["shape"])
            saved = 1 - layer["stored_bytes"] / layer["fp16_bytes"]
            density = f"{layer['density']:.1%}" if "density" in layer else "-"
            lines.append(
                f"    {layer['weight'].ljust(width)}  {shape:>12}  {shown.ljust(fwidth)} "
                + (f"{density:>8} " if sparse else "")
                + f"{_size(layer['stored_bytes']):>10} {_size(layer['fp16_bytes']):>10}  {saved:6.1%}"
                + (f"  ({layer['reason']})" if layer["reason"] not in ("compressed", "dense") else "")
                + (f"  (rows of {layer['fused_into']}: one weight GEMM)" if "fused_into" in layer else "")
                + _padding_note(layer)
            )
        stored = sum(layer["stored_bytes"] for layer in layers)
        fp16 = sum(layer["fp16_bytes"] for layer in layers)
        lines.append(f"    total: {_size(stored)} stored vs {_size(fp16)} as fp16 ({size_vs_fp16(stored, fp16)})")
    lines += _kernel_config_lines(m.get("kernel_configs") or {})
    generic = m.get("tuned_generic_kernels") or []
    if generic:  # the other kernels (generic ops) keep the schedule rules' choice
        lines.append(f"  generic ops scheduled from tuning logs (meta_schedule): {', '.join(generic)}")
    lines += _function_lines(artifact)
    return "\n".join(lines)


def _kernel_config_lines(configs: dict) -> list[str]:
    """Per template kernel the config it was built with and where it came from (a tuning log or the
    default), from the manifest's kernel_configs."""
    if not isinstance(configs, dict) or not configs:
        return []
    tuned = sum(1 for c in configs.values() if c.get("origin") != "default")
    lines = [f"  kernel configs ({len(configs)} template kernels, {tuned} from tuning logs):"]
    width = max(len(name) for name in configs)
    for name, entry in configs.items():
        params = ", ".join(f"{k}={v}" for k, v in (entry.get("config") or {}).items())
        origin = entry.get("origin", "?")
        lines.append(f"    {name.ljust(width)}  {params}  ({'default' if origin == 'default' else 'tuned: ' + origin})")
    return lines


def size_vs_fp16(stored: int, fp16: int) -> str:
    """Stored bytes against the same weights in fp16, in words that read right either way ("3.20x
    smaller than fp16", "2.00x the fp16 size" for float32 weights)."""
    if stored <= 0 or fp16 <= 0:
        return "no weights"
    if stored < fp16:
        return f"{fp16 / stored:.2f}x smaller than fp16"
    return "the fp16 size" if stored == fp16 else f"{stored / fp16:.2f}x the fp16 size"


def _padding_note(layer: dict) -> str:
    """For an FPx layer whose codes are stored for more K than it has (the Tensor Core layout pads K to
    a multiple of 128 with zero codes), say so: worked out from its stored bytes, one fp16 scale per
    output row plus M x Kp codes of 1 + e + m bits."""
    match = re.fullmatch(r"e(\d)m(\d)", str(layer.get("stored_format")))
    if not match:
        return ""
    m, k = layer["shape"]
    bits = 1 + int(match.group(1)) + int(match.group(2))
    padded_k = (layer["stored_bytes"] - 2 * m) * 8 // (m * bits)
    if padded_k <= k:
        return ""
    return f"  (K {k} stored padded to {padded_k}: {1 - k / padded_k:.0%} of its codes are zero padding)"


def _function_lines(artifact: ArtifactFile) -> list[str]:
    """The compiled functions (kernels, fused ops, host helpers such as shape_func) under a heading,
    wrapped to the terminal: from the library's symbol table, else the manifest's list of kernels."""
    names = exported_functions(artifact.read_member(LIBRARY))
    if names is None:
        names = list(artifact.manifest.get("kernels", []))
    indent = "    "
    wrapped = textwrap.wrap(
        ", ".join(names),
        width=max(shutil.get_terminal_size().columns, 60),
        initial_indent=indent,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )
    return [f"  compiled functions ({len(names)}):", *wrapped]


def _kv_cache_line(decoder: dict) -> str:
    """The KV cache in words: its format, bits per stored element (and per element with the per-row
    metadata such as scales), bytes per token over all layers, and the tensors the runtime allocates."""
    from tensorpress.runtime.kv_pool import cache_tensors_of

    tensors = cache_tensors_of(decoder)
    kv = decoder.get("kv_cache") or {"format": "auto", "bits": 8 * _itemsize(tensors[0]["dtype"])}
    config = decoder.get("config", {})
    elements = (
        2 * int(config.get("num_layers", 0)) * int(config.get("num_kv_heads", 0)) * int(config.get("head_dim", 0))
    )
    per_token = decoder.get("bytes_per_token")
    if per_token is None:
        per_token = sum(_row_bytes(t) for t in tensors) // int(decoder["page_size"])
    effective = (
        f", {8 * per_token / elements:.2f} with scales" if elements and 8 * per_token != kv["bits"] * elements else ""
    )
    listed = ", ".join(_tensor(t) for t in tensors)
    window = decoder.get("page_quantisation")
    recent = (
        f"; the first {window['sink_tokens']} and last {window['window_tokens']} tokens of each sequence full "
        f"precision ({window['full_precision_bytes_per_token']} bytes per token), quantised "
        f"{window['group_pages']} pages at a time"
        if window
        else ""
    )
    return (
        f"  KV cache: {kv['format']}, {kv['bits']} bits per element{effective}, {per_token} bytes per token, "
        f"pages of {decoder['page_size']} tokens ({listed}){recent}"
    )


def _itemsize(dtype: str) -> int:
    import numpy as np

    return np.dtype(dtype).itemsize


def _row_bytes(tensor: dict) -> int:
    size = _itemsize(tensor["dtype"])
    for d in tensor["shape"]:
        if d != "num_pages":
            size *= int(d)
    return size


def _recipe_words(recipe: dict) -> str:
    weights = recipe.get("weights")
    sparse = recipe.get("sparsity")
    if isinstance(sparse, dict):  # SparseConfig.to_dict()
        return f"{sparse['sparsity']:.0%} sparse ({sparse['prune']} pruning, format {sparse['format']})"
    if isinstance(weights, dict):
        return f"e{weights['ebits']}m{weights['mbits']} ({recipe.get('scale_search', 'absmax')})"
    return f"{weights} ({recipe.get('scale_search', 'absmax')})" if weights else "dense"


def _tensor(t: dict) -> str:
    return f"{t['name']} {t['dtype']}[{', '.join(str(d) for d in t['shape'])}]"


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _format_shown(layer: dict) -> str:
    """The format asked for, and the exact one stored where they differ (fp6 -> e3m2, fp6-auto -> e2m3)."""
    stored = layer.get("stored_format")
    return layer["format"] if stored in (None, layer["format"]) else f"{layer['format']}:{stored}"
