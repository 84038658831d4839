"""Input-shape overrides (`tensorpress compile --input-shape x=1,128`, `compile(input_shapes=...)`),
checked before any work: every dim a positive size or a symbolic name, and, for an ONNX graph, one dim
per declared axis with the fixed sizes kept."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tensorpress.errors import ConfigError

Dims = list[int | str]


def check_input_shapes(input_shapes: dict[str, Dims], model: Any) -> None:
    """Raise ConfigError, in one sentence, for an override that cannot be right: a dim that is not a
    positive int or a name, a model that takes no overrides, or (ONNX) a rank or fixed size other than
    the graph declares. Unknown input names are the importer's to report (it lists the real ones)."""
    if not isinstance(input_shapes, dict):
        raise ConfigError(f"input_shapes must be a dict of input name -> dims, got {type(input_shapes).__name__}.")
    for name, dims in input_shapes.items():
        shown = _shown(name, dims)
        if not isinstance(dims, (list, tuple)) or not dims:
            raise ConfigError(f"input shape {shown} must be a non-empty list of dims (sizes or names).")
        for axis, dim in enumerate(dims):
            if isinstance(dim, bool) or not isinstance(dim, (int, str)):
                raise ConfigError(f"input shape {shown}: axis {axis} must be a size or a name, not {dim!r}.")
            if isinstance(dim, int) and dim < 1:
                raise ConfigError(f"input shape {shown}: axis {axis} is {dim}; sizes must be 1 or more.")
            if isinstance(dim, str) and not dim.isidentifier():
                raise ConfigError(
                    f"input shape {shown}: axis {axis} is {dim!r}, neither a size nor a name such as 'batch'."
                )
    declared = _declared_onnx_shapes(model)
    if declared is None:
        raise ConfigError(
            "input shapes can be overridden for ONNX graphs only; torch and Hugging Face models take their "
            "shapes from example_inputs or their config."
        )
    for name, dims in input_shapes.items():
        want = declared.get(name)
        if want is None:
            continue
        if len(dims) != len(want):
            raise ConfigError(
                f"input shape {_shown(name, dims)} has {len(dims)} dims, but the model's input {name} has "
                f"{len(want)}: {_shown(name, want)}."
            )
        for axis, (dim, fixed) in enumerate(zip(dims, want)):
            if isinstance(fixed, int) and fixed > 0 and dim != fixed:
                raise ConfigError(
                    f"input shape {_shown(name, dims)} does not fit the model's input {_shown(name, want)}: "
                    f"axis {axis} is fixed at {fixed}."
                )


def _shown(name: str, dims: Any) -> str:
    return f"{name}=[{', '.join(str(d) for d in dims)}]" if isinstance(dims, (list, tuple)) else f"{name}={dims!r}"


def _declared_onnx_shapes(model: Any) -> dict[str, Dims] | None:
    """The graph inputs' declared dims (a size, a dim name, or "?" where neither is given) for an .onnx
    path or an onnx.ModelProto; None for other models. A file is read without its external data."""
    if isinstance(model, (str, os.PathLike)):
        if Path(model).suffix != ".onnx" or not Path(model).is_file():
            return None if Path(model).suffix != ".onnx" else {}  # a missing file: the importer says so
        import onnx

        try:
            proto = onnx.load(str(model), load_external_data=False)
        except Exception:  # an unreadable file: the importer says so, in its words
            return {}
    elif type(model).__module__.startswith("onnx"):
        proto = model
    else:
        return None
    initializers = {init.name for init in proto.graph.initializer}
    shapes: dict[str, Dims] = {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    return shapes
