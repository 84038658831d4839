"""ONNX files -> ImportedModel, through tvm.relax.frontend.onnx."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tensorpress.errors import ModelImportError, UnsupportedOperatorError
from tensorpress.frontend.imported_model import ImportedModel
from tensorpress.frontend.relax_params import output_specs, tensor_spec, to_numpy


def import_onnx(
    model: str | os.PathLike | object, input_shapes: dict[str, list[int | str]] | None = None
) -> ImportedModel:
    """Import an ONNX model (a path or an onnx.ModelProto).

    `input_shapes` overrides the shapes declared in the file (a string dim stays symbolic). Weights
    (initializers) become named trailing parameters of "main"; every operator is checked before any
    conversion work, and an unsupported one fails naming the operator and its node.
    """
    import onnx

    source = str(model) if isinstance(model, (str, os.PathLike)) else "onnx.ModelProto"
    proto: Any = _load(model) if isinstance(model, (str, os.PathLike)) else model
    check_onnx_operators(proto, source)

    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx import from_onnx

    initializer_names = {init.name for init in proto.graph.initializer}
    graph_inputs = [i.name for i in proto.graph.input if i.name not in initializer_names]
    unknown = set(input_shapes or {}) - set(graph_inputs)
    if unknown:
        raise ModelImportError(
            f"{source} has no input named {sorted(unknown)[0]!r}; its inputs are {', '.join(graph_inputs)}."
        )
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)
    try:
        mod = from_onnx(
            proto,
            shape_dict=dict(input_shapes or {}),
            opset=opset,
            keep_params_in_input=True,
            sanitize_input_names=False,
        )
    except onnx.checker.ValidationError as err:
        raise ModelImportError(f"{source} is not a valid ONNX model: {err}.") from err
    mod, detached = detach_params(mod)
    func = mod["main"]
    num_input = int(func.attrs["num_input"])
    weights = detached.get("main", [])
    weight_vars = list(func.params)[num_input:]
    params = {var.name: to_numpy(value) for var, value in zip(weight_vars, weights)}
    inputs = [tensor_spec(var) for var in list(func.params)[:num_input]]
    outputs = output_specs(func, [o.name for o in proto.graph.output])
    return ImportedModel(mod, params, inputs, outputs, kind="graph", source=f"onnx:{source}")


def _load(path: str | os.PathLike):
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelImportError(f"model file {path} does not exist.")
    try:
        return onnx.load(str(path))
    except Exception as err:  # onnx raises DecodeError / RuntimeError variants
        raise ModelImportError(
            f"{path} could not be read as an ONNX model ({type(err).__name__}); check that the file is "
            "a complete .onnx export."
        ) from err


def check_onnx_operators(proto, source: str) -> None:
    """Fail before any work if the graph (or a subgraph) uses an operator the frontend lacks."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    supported = set(_get_convert_map()) | {"Constant", "If"}
    for index, node, where in _walk_nodes(proto.graph, "graph"):
        if node.domain not in ("", "ai.onnx") or node.op_type not in supported:
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            raise UnsupportedOperatorError(
                f"{source}: operator {op!r} (node {node.name or '<unnamed>'!r}, #{index} in {where}) is not "
                "supported by tensorpress's ONNX frontend; re-export the model without it or replace it "
                "with supported operators."
            )


def _walk_nodes(graph, where: str):
    for index, node in enumerate(graph.node):
        yield index, node, where
        for attr in node.attribute:
            if attr.g is not None and len(attr.g.node):
                yield from _walk_nodes(attr.g, f"subgraph {attr.name!r} of node {node.name!r}")
