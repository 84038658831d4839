"""Bring a valid ONNX graph into the forms TVM's ONNX converter reads correctly, before conversion.

TVM 0.27's converter (`tvm.relax.frontend.onnx`) mishandles a few forms that are valid ONNX and common in
older exports (IR version <= 3, opsets 1-9, many model-zoo files):

    initializer also listed in graph.input   -> made a parameter twice ("used before its definition")
                                                 fix: drop it from graph.input (it stays a weight)
    Slice-1 (starts/ends/axes attributes)    -> read by the opset-13 converter, which wants inputs
                                                 fix: the attributes become Constant inputs
    PRelu-1/6 with a per-channel slope [C]   -> old PRelu applies slope[c] along axis 1; the converter
                                                 broadcasts it numpy-style (last axis) and TOPI asserts
                                                 fix: the slope becomes [C, 1, ..., 1]

and a few it converts to a silently wrong answer, rewritten into ONNX it gets right (onnx_rewrites.py):

    IsInf with detect_positive/negative = 0, SpaceToDepth mode=CRD, ThresholdedRelu (NaN for -inf / NaN),
    float Mod with fmod=0 (inf / zero operands), BitShift by a negative amount or >= the bit width,
    ConvTranspose with output_shape (ignored)

Forms it cannot rewrite are refused with one sentence naming the operator, the node and the opset, and
so are forms the converter accepts but gets wrong (silently, in TVM 0.27):

    LayerNormalization whose Mean / InvStdDev outputs are used   -> the converter returns scalars
    BatchNormalization whose running mean / var outputs are used -> training mode: not computed
    Dropout whose mask output is used, or in training mode       -> no real mask, no random drop
    RoiAlign with mode=max                                       -> computed as the average
    a graph input or output of type bfloat16                     -> numpy has no bfloat16 for the runtime
    a graph output that is a sequence (If, SplitToSequence, ...) -> the runtime returns tensors only
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tensorpress.errors import ModelImportError
from tensorpress.frontend.onnx_rewrites import all_graphs, needs_rewrite, rewrite_wrongly_converted


def default_opset(proto: Any) -> int:
    """The model's opset of the default ("" / "ai.onnx") domain (1 when it declares none)."""
    versions = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    return max(versions, default=1)


def normalise_onnx(proto: Any, source: str, owned: bool = False) -> Any:
    """Return `proto` with the rewrites of the module docstring applied.

    The caller's proto is left untouched unless `owned` (it was loaded here): a rewrite works on a copy.
    Raises ModelImportError for an empty model or a form that cannot be rewritten.
    """
    import onnx

    if not proto.HasField("graph") or not proto.graph.output:
        raise ModelImportError(f"{source} holds no ONNX graph (an empty or truncated file); export the model again.")
    opset = default_opset(proto)
    graph = proto.graph
    _refuse_wrongly_converted(graph, source, opset)
    _refuse_unsupported_io(graph, source)
    initializers = {init.name for init in graph.initializer}
    duplicated_inputs = any(i.name in initializers for i in graph.input)
    old_slices = opset < 10 and any(n.op_type == "Slice" for n in graph.node)
    old_prelus = opset < 7 and any(n.op_type == "PRelu" for n in graph.node)
    rewrites = needs_rewrite(graph)
    if not (duplicated_inputs or old_slices or old_prelus or rewrites):
        return proto
    if not owned:
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        proto, graph = copy, copy.graph
    if duplicated_inputs:
        _drop_initializer_inputs(graph, initializers)
        proto.ir_version = max(proto.ir_version, 4)  # IR 4 is the first that allows it
    if old_slices:
        _slice_attributes_to_inputs(graph)
    if old_prelus:
        _prelu_slope_per_channel(proto, source, opset)
    if rewrites:
        rewrite_wrongly_converted(proto, source, opset)
    return proto


# operator -> (first output index the converter gets wrong, what those outputs are)
_WRONG_EXTRA_OUTPUTS = {
    "LayerNormalization": (1, "Mean/InvStdDev outputs"),
    "BatchNormalization": (1, "running mean/variance outputs (training mode)"),
    "Dropout": (1, "mask output"),
}


def _refuse_wrongly_converted(graph: Any, source: str, opset: int) -> None:
    """Refuse nodes whose outputs TVM's converter computes wrongly without saying so (see the docstring)."""
    from onnx import helper

    graphs = all_graphs(graph)  # If branches too
    used = {name for g in graphs for name in [*(i for n in g.node for i in n.input), *(o.name for o in g.output)]}
    for node in (node for g in graphs for node in g.node):
        wrong = _WRONG_EXTRA_OUTPUTS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if wrong and any(name and name in used for name in list(node.output)[wrong[0] :]):
            why = f"its {wrong[1]} are used, which TVM's ONNX converter does not compute"
            raise _refuse(source, node, opset, why, "export the model for inference, without those outputs")
        if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            why = "it has a training_mode input (random dropout is not compiled)"
            raise _refuse(source, node, opset, why, "export the model for inference (eval mode)")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "RoiAlign" and attrs.get("mode", b"avg") == b"max":
            why = "TVM's ONNX converter computes mode=max as the average"
            raise _refuse(source, node, opset, why, "use mode=avg or run that step outside the compiled model")


def _refuse_unsupported_io(graph: Any, source: str) -> None:
    """Refuse graph inputs / outputs the runtime cannot hand over: bfloat16 (numpy has no such dtype) and
    sequences (the runtime returns a flat tuple of tensors); an If node is checked by its branches' outputs,
    which is where a sequence output shows when the graph output has no declared type."""
    from onnx import TensorProto

    for kind, infos in (("input", graph.input), ("output", graph.output)):
        for info in infos:
            if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type == TensorProto.BFLOAT16:
                raise ModelImportError(
                    f"{source}: graph {kind} {info.name!r} is bfloat16, which tensorpress cannot take or return "
                    f"(numpy has no bfloat16); bfloat16 {kind}s are not supported, cast to float32 in the model."
                )
            if info.type.HasField("sequence_type"):
                raise _sequence_io(source, kind, info.name)
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type == "If" and any(name in outputs for name in node.output):
            branches = [a.g for a in node.attribute if a.name in ("then_branch", "else_branch")]
            if any(o.type.HasField("sequence_type") for g in branches for o in g.output):
                raise _sequence_io(source, "output", node.output[0])


def _sequence_io(source: str, kind: str, name: str) -> ModelImportError:
    return ModelImportError(
        f"{source}: graph {kind} {name!r} is an ONNX sequence, which the runtime cannot take or return (it "
        f"handles tensors only); make the sequence's tensors separate graph {kind}s."
    )


def _drop_initializer_inputs(graph: Any, initializers: set[str]) -> None:
    """An initializer listed in graph.input is an overridable default (ONNX IR <= 3 lists every weight
    there); tensorpress compiles it as a weight, so it leaves the input list."""
    kept = [i for i in graph.input if i.name not in initializers]
    del graph.input[:]
    graph.input.extend(kept)


def _slice_attributes_to_inputs(graph: Any) -> None:
    """Slice-1 keeps starts/ends/axes as attributes; Slice-10 takes them as inputs. Each attribute form
    gets Constant nodes for them, placed just before it (same semantics: steps are 1)."""
    from onnx import helper, numpy_helper

    nodes = []
    for index, node in enumerate(graph.node):
        attrs = {a.name: list(a.ints) for a in node.attribute}
        if node.op_type != "Slice" or len(node.input) > 1 or "starts" not in attrs:
            nodes.append(node)
            continue
        stem = f"tensorpress_slice{index}_{node.name or node.output[0]}"
        names = []
        for key in ("starts", "ends", "axes"):
            if key not in attrs:
                continue
            value = numpy_helper.from_array(np.asarray(attrs[key], dtype=np.int64), f"{stem}_{key}")
            nodes.append(helper.make_node("Constant", [], [value.name], value=value, name=value.name))
            names.append(value.name)
        nodes.append(helper.make_node("Slice", [node.input[0], *names], list(node.output), name=node.name))
    del graph.node[:]
    graph.node.extend(nodes)


def _prelu_slope_per_channel(proto: Any, source: str, opset: int) -> None:
    """PRelu before opset 7 applies a slope of shape [C] along axis 1 of X (the channels); the slope
    initializer is reshaped to [C, 1, ..., 1] so numpy broadcasting (opset 7) gives the same result."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    ranks: dict[str, int] | None = None
    for index, node in enumerate(graph.node):
        if node.op_type != "PRelu" or node.input[1] not in inits:
            if node.op_type == "PRelu":
                raise _refuse(source, node, opset, "its slope is computed in the graph, not a stored initializer")
            continue
        slope = numpy_helper.to_array(inits[node.input[1]])
        if slope.ndim != 1 or slope.size == 1:
            continue  # a scalar slope broadcasts the same either way
        ranks = ranks if ranks is not None else _known_ranks(proto)
        rank = ranks.get(node.input[0])
        if rank is None:
            raise _refuse(source, node, opset, "the rank of its input is not known")
        if rank < 2:
            continue
        per_channel = slope.reshape(slope.size, *([1] * (rank - 2)))
        reshaped = numpy_helper.from_array(per_channel, f"tensorpress_prelu{index}_{node.input[1]}_per_channel")
        graph.initializer.append(reshaped)
        node.input[1] = reshaped.name


def _known_ranks(proto: Any) -> dict[str, int]:
    """Rank of every tensor ONNX shape inference can see (inputs, outputs, value_info)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - an unreadable graph just has no known ranks
        inferred = proto
    ranks: dict[str, int] = {}
    graph = inferred.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            ranks[info.name] = len(info.type.tensor_type.shape.dim)
    for init in graph.initializer:
        ranks[init.name] = len(init.dims)
    return ranks


def _refuse(source: str, node: Any, opset: int, why: str, fix: str = "re-export the model with opset 7 or newer"):
    return ModelImportError(
        f"{source}: operator {node.op_type!r} (node {node.name or node.output[0]!r}) at opset {opset} cannot be "
        f"compiled because {why}; {fix}."
    )
