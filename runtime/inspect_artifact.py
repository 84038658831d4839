"""`tensorpress inspect`: an artifact's manifest in words (what it was built from and for, its
signature, each linear layer's format and the bytes it saves) and the functions its library holds."""

from __future__ import annotations

import json
import os
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
        f"on {m['created']} from {m.get('source', '?')}",
        f"  target: {target['kind']}{':' + target['arch'] if target.get('arch') else ''}, "
        f"dtype {m.get('recipe', {}).get('dtype', '?')}, weights {_recipe_words(m.get('recipe', {}))}",
        "  parts: " + ", ".join(f"{name} {p['bytes'] / 1e6:.2f} MB" for name, p in m["parts"].items()),
        "  inputs:  " + ", ".join(_tensor(t) for t in m.get("inputs", [])),
        "  outputs: " + ", ".join(_tensor(t) for t in m.get("outputs", [])),
    ]
    for name, fn in m.get("functions", {}).items():
        lines.append(f"  function {name}: {fn['num_input']} inputs, {len(fn['params'])} weights")
    layers = m.get("layers", [])
    if layers:
        width = max(len(layer["weight"]) for layer in layers)
        formats = [_format_shown(layer) for layer in layers]
        fwidth = max(11, *(len(f) for f in formats))
        lines.append(f"  linear layers ({len(layers)}):")
        lines.append(
            f"    {'weight'.ljust(width)}  {'shape':>12}  {'format'.ljust(fwidth)} {'stored':>10} {'fp16':>10}  saved"
        )
        for layer, shown in zip(layers, formats):
            shape = "x".join(str(d) for d in layer["shape"])
            saved = 1 - layer["stored_bytes"] / layer["fp16_bytes"]
            lines.append(
                f"    {layer['weight'].ljust(width)}  {shape:>12}  {shown.ljust(fwidth)} "
                f"{_size(layer['stored_bytes']):>10} {_size(layer['fp16_bytes']):>10}  {saved:6.1%}"
                + (f"  ({layer['reason']})" if layer["reason"] not in ("compressed", "dense") else "")
            )
        stored = sum(layer["stored_bytes"] for layer in layers)
        fp16 = sum(layer["fp16_bytes"] for layer in layers)
        lines.append(
            f"    total: {_size(stored)} stored vs {_size(fp16)} as fp16 ({fp16 / max(stored, 1):.2f}x smaller)"
        )
    lines += _function_lines(artifact)
    return "\n".join(lines)


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


def _recipe_words(recipe: dict) -> str:
    weights = recipe.get("weights")
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
