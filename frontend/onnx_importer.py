"""ONNX files -> ImportedModel, through tvm.relax.frontend.onnx."""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from pathlib import Path
from typing import Any

from tensorpress.errors import ModelImportError, UnsupportedOperatorError
from tensorpress.frontend.onnx_normalise import default_opset, normalise_onnx
from tensorpress.frontend.onnx_shape_lengths import bind_computed_lengths
from tensorpress.frontend.relax_params import output_specs, split_params, tensor_spec, to_numpy
from tensorpress.imported_model import ImportedModel


def import_onnx(
    model: str | os.PathLike | object, input_shapes: dict[str, list[int | str]] | None = None
) -> ImportedModel:
    """Import an ONNX model (a path or an onnx.ModelProto).

    `input_shapes` overrides the shapes declared in the file (a string dim stays symbolic). Weights
    (initializers) become named trailing parameters of "main"; every operator is checked before any
    conversion work, and an unsupported one fails naming the operator and its node.
    """
    import onnx

    from_file = isinstance(model, (str, os.PathLike))
    source = str(model) if from_file else "onnx.ModelProto"
    proto: Any = _load(model) if isinstance(model, (str, os.PathLike)) else model
    proto = normalise_onnx(proto, source, owned=from_file)
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
    opset = default_opset(proto)
    converter_log = io.StringIO()
    try:
        with contextlib.redirect_stdout(converter_log), warnings.catch_warnings():  # TVM prints failures
            # the checker flags Slice-1 nodes whose attributes onnx_normalise made inputs (read as Slice-10)
            warnings.filterwarnings("ignore", message=r"(?s).*OpType: Slice\b")
            mod = from_onnx(
                proto,
                shape_dict=dict(input_shapes or {}),
                opset=opset,
                keep_params_in_input=True,
                sanitize_input_names=False,
            )
    except onnx.checker.ValidationError as err:
        raise ModelImportError(f"{source} is not a valid ONNX model: {err}.") from err
    except Exception as err:  # noqa: BLE001 - any converter failure is refused naming the operator
        raise _conversion_error(source, opset, converter_log.getvalue(), err) from err
    mod, detached = detach_params(bind_computed_lengths(mod))
    func = mod["main"]
    input_vars, weight_vars = split_params(func)
    weights = detached.get("main", [])
    params = {var.name: to_numpy(value) for var, value in zip(weight_vars, weights)}
    inputs = [tensor_spec(var) for var in input_vars]
    outputs = output_specs(func, [o.name for o in proto.graph.output])
    return ImportedModel(mod, params, inputs, outputs, kind="graph", source=f"onnx:{source}")


def _load(path: str | os.PathLike):
    import onnx
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    path = Path(path)
    if not path.is_file():
        raise ModelImportError(f"model file {path} does not exist.")
    if path.stat().st_size == 0:
        raise ModelImportError(f"{path} is empty (0 bytes); export the model again.")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError / RuntimeError variants
        raise ModelImportError(
            f"{path} could not be read as an ONNX model ({type(err).__name__}); check that the file is "
            "a complete .onnx export."
        ) from err
    external = [t for t in proto.graph.initializer if uses_external_data(t)]
    for tensor in external:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not (path.parent / location).is_file():
            raise ModelImportError(
                f"{path} keeps the weight {tensor.name!r} in the external data file {path.parent / location}, "
                "which does not exist; put that file next to the model."
            )
    if external:
        try:
            load_external_data_for_model(proto, str(path.parent))
        except Exception as err:  # a side file shorter than its offsets say, unreadable, ...
            raise ModelImportError(f"{path}: its external weight data could not be read ({err}).") from err
    return proto


def _conversion_error(source: str, opset: int, log: str, err: Exception) -> ModelImportError:
    """One sentence for a failure inside TVM's converter, naming the operator it printed."""
    failed = re.findall(r"Error converting operator (\S+?),", log)
    what = f"operator {failed[-1]!r}" if failed else "the graph"
    detail = (str(err).strip().splitlines() or [type(err).__name__])[-1]
    return ModelImportError(
        f"{source}: TVM's ONNX converter cannot convert {what} at opset {opset} ({type(err).__name__}: "
        f"{detail[:200]}); re-export the model with another opset or replace that operator."
    )


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
