"""Rewrite ONNX nodes that TVM 0.27's converter turns into a silently wrong answer, or cannot convert,
into equivalent ONNX it converts correctly (each rewrite is the ONNX definition spelled with simpler operators):

    IsInf, detect_positive or detect_negative = 0   the converter ignores both: IsInf(x) And the sign test
    SpaceToDepth mode=CRD                           converted as DCR: Reshape / Transpose / Reshape
    ThresholdedRelu                                 converted as (x > alpha) * x: NaN for -inf and NaN;
                                                    Where(x > alpha, x, 0)
    Mod fmod=0 on floats                            converted as x - floor(x / y) * y: NaN where numpy
                                                    (and ONNX) give inf or x; built on fmod, as numpy does
    BitShift                                        a shift by a negative amount or >= the bit width is
                                                    undefined in LLVM; ONNX defines it as the sign fill
    ConvTranspose with output_shape                 the attribute is ignored: it becomes the equivalent
                                                    pads / output_padding (needs static shapes)
    ConstantOfShape of an empty shape (a scalar)    the converter fails (broadcast_to a 0-d shape), as in
                                                    torch's BERT export at opset 20: a scalar Constant

A node whose rewrite needs a shape or dtype that ONNX shape inference cannot tell is refused in one sentence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

_FLOATS = (1, 10, 11)  # TensorProto FLOAT, FLOAT16, DOUBLE
_Types = dict[str, tuple[int, list[int] | None]]  # tensor name -> (ONNX element type, static shape or None)


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _wrong(node: Any) -> bool:
    """True when `node` is one of the forms of the module docstring (Mod is checked for floats later)."""
    if node.domain not in ("", "ai.onnx"):
        return False
    attrs = _attrs(node)
    if node.op_type == "IsInf":
        return attrs.get("detect_positive", 1) == 0 or attrs.get("detect_negative", 1) == 0
    if node.op_type == "SpaceToDepth":
        return attrs.get("mode", b"DCR") == b"CRD"
    if node.op_type == "Mod":
        return attrs.get("fmod", 0) == 0
    if node.op_type == "ConvTranspose":
        return bool(attrs.get("output_shape"))
    return node.op_type in ("ThresholdedRelu", "BitShift", "ConstantOfShape")


# Forms wrong only for some input shapes: where shape inference cannot tell, the node is left to the converter
_ONLY_WHEN_KNOWN = ("ConstantOfShape",)


class _CannotRewrite(Exception):
    """Raised by a rewrite with the reason (a clause) the node cannot be rewritten."""


def all_graphs(graph: Any) -> list[Any]:
    """`graph` and every subgraph nested in its nodes (If branches, Loop / Scan bodies), outer first."""
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                found.extend(all_graphs(sub))
    return found


def needs_rewrite(graph: Any) -> bool:
    return any(_wrong(node) for g in all_graphs(graph) for node in g.node)


class _Builder:
    """Emits the replacement nodes and constants of one rewritten node, named after it."""

    def __init__(self, stem: str):
        self.stem, self.count = stem, 0
        self.nodes: list[Any] = []

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        self.count += 1
        name = out or f"{self.stem}_{self.count}"
        self.nodes.append(_make_node(op_type, list(inputs), [name], f"{self.stem}_{op_type}{self.count}", attrs))
        return name

    def const(self, value: Any, dtype: Any) -> str:
        from onnx import numpy_helper

        """A Constant node (folded by the converter; an initializer would become a stored weight)."""
        self.count += 1
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), f"{self.stem}_c{self.count}")
        self.nodes.append(_make_node("Constant", [], [tensor.name], tensor.name, {"value": tensor}))
        return tensor.name


def _make_node(op_type: str, inputs: list[str], outputs: list[str], name: str, attrs: dict[str, Any]) -> Any:
    from onnx import helper

    return helper.make_node(op_type, inputs, outputs, name=name, **attrs)


def rewrite_wrongly_converted(proto: Any, source: str, opset: int) -> None:
    """Replace, in place, each node of the module docstring by its equivalent; raises ModelImportError
    where the rewrite needs a dtype or shape that ONNX shape inference cannot tell. Subgraphs (If
    branches) are rewritten too."""
    types = _inferred_types(proto)
    # innermost first: rewriting a graph copies its nodes, so a subgraph is done before its parent
    for depth, graph in reversed(list(enumerate(all_graphs(proto.graph)))):
        _rewrite_graph(graph, f"tensorpress_g{depth}_" if depth else "tensorpress_", types, source, opset)


def _rewrite_graph(graph: Any, prefix: str, types: _Types, source: str, opset: int) -> None:
    from tensorpress.frontend.onnx_normalise import _refuse

    nodes = []
    for index, node in enumerate(graph.node):
        if not _wrong(node):
            nodes.append(node)
            continue
        b = _Builder(f"{prefix}{node.op_type.lower()}{index}")
        try:
            known = types.get(node.input[0])
            if known is None and node.op_type in _ONLY_WHEN_KNOWN:
                nodes.append(node)
                continue
            if known is None:
                raise _CannotRewrite("the dtype of its input is not known")
            if not _REWRITES[node.op_type](b, node, types, *known):
                nodes.append(node)
                continue
        except _CannotRewrite as err:
            why = f"TVM's ONNX converter gets this form wrong and it cannot be rewritten: {err}"
            raise _refuse(source, node, opset, why, "give the graph static input shapes") from None
        nodes.extend(b.nodes)
    del graph.node[:]
    graph.node.extend(nodes)


def _inferred_types(proto: Any) -> _Types:
    """(ONNX element type, static shape or None) of every tensor ONNX shape inference can see."""
    import onnx

    try:
        graph = onnx.shape_inference.infer_shapes(proto).graph
    except Exception:  # noqa: BLE001 - an unreadable graph just has no known types
        graph = proto.graph
    known: _Types = {}
    graphs = all_graphs(graph)
    infos = [info for g in graphs for info in [*g.input, *g.value_info, *g.output]]
    for info in infos:
        if not info.type.HasField("tensor_type") or not info.type.tensor_type.elem_type:
            continue
        tensor = info.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        static = tensor.HasField("shape") and None not in dims
        known[info.name] = (tensor.elem_type, [int(d) for d in dims] if static else None)  # type: ignore[arg-type]
    for init in (init for g in graphs for init in g.initializer):
        known[init.name] = (init.data_type, list(init.dims))
    return known


def _np_dtype(elem_type: int) -> Any:
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(elem_type)


def _isinf(b: _Builder, node: Any, types: _Types, elem_type: int, shape: list[int] | None) -> bool:
    """IsInf(x) And (x > -x) keeps +inf only; (x < -x) keeps -inf only; neither: nothing."""
    attrs = _attrs(node)
    x, out = node.input[0], node.output[0]
    positive, negative = attrs.get("detect_positive", 1), attrs.get("detect_negative", 1)
    inf = b.op("IsInf", x)
    sign = b.op("Greater" if positive else "Less", x, b.op("Neg", x))
    if not positive and not negative:
        sign = b.op("Greater", x, x)  # false everywhere, NaN included
    b.op("And", inf, sign, out=out)
    return True


def _space_to_depth_crd(b: _Builder, node: Any, types: _Types, elem_type: int, shape: list[int] | None) -> bool:
    """CRD: y[n, c * bs * bs + i * bs + j, h, w] = x[n, c, h * bs + i, w * bs + j] (ONNX's reference)."""
    if shape is None or len(shape) != 4:
        raise _CannotRewrite("its input has no static 4-d shape")
    bs = int(_attrs(node)["blocksize"])
    n, c, h, w = shape
    blocks = b.op("Reshape", node.input[0], b.const([n, c, h // bs, bs, w // bs, bs], np.int64))
    moved = b.op("Transpose", blocks, perm=[0, 1, 3, 5, 2, 4])
    b.op("Reshape", moved, b.const([n, c * bs * bs, h // bs, w // bs], np.int64), out=node.output[0])
    return True


def _thresholded_relu(b: _Builder, node: Any, types: _Types, elem_type: int, shape: list[int] | None) -> bool:
    dtype = _np_dtype(elem_type)
    x = node.input[0]
    above = b.op("Greater", x, b.const(_attrs(node).get("alpha", 1.0), dtype))
    b.op("Where", above, x, b.const(0, dtype), out=node.output[0])
    return True


def _floor_mod(b: _Builder, node: Any, types: _Types, elem_type: int, shape: list[int] | None) -> bool:
    """numpy's float mod: m = fmod(x, y); m + y where m != 0 and m, y differ in sign; else m."""
    if elem_type not in _FLOATS:
        return False  # integer floor_mod is converted correctly
    x, y = node.input[0], node.input[1]
    zero = b.const(0, _np_dtype(elem_type))
    m = b.op("Mod", x, y, fmod=1)
    differ = b.op("Xor", b.op("Less", y, zero), b.op("Less", m, zero))
    fix = b.op("And", b.op("Not", b.op("Equal", m, zero)), differ)
    b.op("Where", fix, b.op("Add", m, y), m, out=node.output[0])
    return True


def _bit_shift(b: _Builder, node: Any, types: _Types, elem_type: int, shape: list[int] | None) -> bool:
    """Shift by a clamped in-range amount; out-of-range amounts give the ONNX sign fill: 0, or for a
    signed right shift x >> (width - 1) (-1 for negative x)."""
    dtype = np.dtype(_np_dtype(elem_type))
    width = dtype.itemsize * 8
    x, y = node.input[0], node.input[1]
    zero = b.const(0, dtype)
    direction = _attrs(node).get("direction", b"LEFT")
    outside = b.op("Not", b.op("Less", y, b.const(width, dtype)))
    if dtype.kind == "i":
        outside = b.op("Or", outside, b.op("Less", y, zero))
    shifted = b.op("BitShift", x, b.op("Where", outside, zero, y), direction=direction.decode())
    fill = zero
    if direction == b"RIGHT" and dtype.kind == "i":
        fill = b.op("BitShift", x, b.const(width - 1, dtype), direction="RIGHT")
    b.op("Where", outside, fill, shifted, out=node.output[0])
    return True


def _conv_transpose_output_shape(
    b: _Builder, node: Any, types: _Types, elem_type: int, shape: list[int] | None
) -> bool:
    """ONNX: with output_shape, pads are generated from the total padding (full - out) and any given pads
    are ignored: start = total // 2 for SAME_UPPER, else total - total // 2 (onnxruntime agrees). The end
    becomes end pads (cropping) or, when negative, extra output_padding (zero rows past the end)."""
    attrs = _attrs(node)
    weight = types.get(node.input[1], (0, None))[1]
    if shape is None or (weight is None and "kernel_shape" not in attrs):
        raise _CannotRewrite("its input or weight has no static shape")
    out = list(attrs.pop("output_shape"))
    rank = len(shape) - 2
    kernel = list(attrs.get("kernel_shape") or weight[2:])  # type: ignore[index]
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    extra = list(attrs.get("output_padding", [0] * rank))
    auto_pad = attrs.pop("auto_pad", b"NOTSET")
    attrs.pop("pads", None)
    pads = [0] * rank
    if len(out) != rank:
        raise _CannotRewrite(f"its output_shape {out} does not give one size per spatial axis")
    ends = []
    for i in range(rank):
        full = strides[i] * (shape[i + 2] - 1) + extra[i] + (kernel[i] - 1) * dilations[i] + 1
        total = full - out[i]
        pads[i] = total // 2 if auto_pad == b"SAME_UPPER" else total - total // 2
        end = full - pads[i] - out[i]
        if pads[i] < 0 or extra[i] - min(end, 0) >= max(strides[i], dilations[i]):
            raise _CannotRewrite(f"output_shape {out} needs padding the converter cannot express")
        extra[i] -= min(end, 0)
        ends.append(max(end, 0))
    attrs.update(pads=pads + ends, output_padding=extra)
    b.nodes.append(_make_node("ConvTranspose", list(node.input), list(node.output), node.name, attrs))
    return True


def _scalar_constant_of_shape(b: _Builder, node: Any, types: _Types, elem_type: int, shape: list[int] | None) -> bool:
    if shape != [0]:  # a shape of known length > 0, or unknown: the converter handles it
        return False
    from onnx import numpy_helper

    value = _attrs(node).get("value")
    fill = np.asarray(numpy_helper.to_array(value) if value is not None else np.float32(0)).reshape(())
    b.nodes.append(_make_node("Constant", [], list(node.output), node.name, {"value": numpy_helper.from_array(fill)}))
    return True


_REWRITES: dict[str, Callable[[_Builder, Any, _Types, int, list[int] | None], bool]] = {
    "IsInf": _isinf,
    "SpaceToDepth": _space_to_depth_crd,
    "ThresholdedRelu": _thresholded_relu,
    "Mod": _floor_mod,
    "BitShift": _bit_shift,
    "ConvTranspose": _conv_transpose_output_shape,
    "ConstantOfShape": _scalar_constant_of_shape,
}
