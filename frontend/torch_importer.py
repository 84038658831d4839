"""torch modules -> ImportedModel, through torch.export (default) or torch.fx symbolic tracing."""

from __future__ import annotations

import copy
import inspect
from typing import Any

from tensorpress.errors import ModelImportError, UnsupportedOperatorError
from tensorpress.frontend.relax_params import output_specs, rename_params, split_params, tensor_spec, to_numpy
from tensorpress.imported_model import ImportedModel


def import_torch(
    model: Any,
    example_inputs: tuple | None = None,
    *,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_shapes: Any = None,
    tracer: str = "export",
    dtype: str | None = None,
) -> ImportedModel:
    """Import a torch.nn.Module (with example inputs), a torch.export.ExportedProgram, or an fx GraphModule.

    tracer="export" (default) uses torch.export; "fx" uses torch.fx.symbolic_trace and needs example
    inputs for the shapes. dtype "float16"/"float32" casts the module and its floating-point example
    inputs first (None keeps them). Weights become named parameters under their state-dict names
    (`encoder.layer.0.attention.self.query.weight`). Unsupported operators fail before translation,
    naming the operator and the source line that produced it.
    """
    import torch

    if dtype is not None and isinstance(model, torch.nn.Module):
        cast = getattr(torch, dtype)
        model = copy.deepcopy(model).to(cast)  # nn.Module.to works in place: leave the user's module be
        if example_inputs is not None:
            example_inputs = tuple(t.to(cast) if t.is_floating_point() else t for t in example_inputs)
    elif dtype is not None and isinstance(model, torch.export.ExportedProgram):
        raise ModelImportError(
            "an ExportedProgram is compiled in its own dtype; export the module in the dtype you want."
        )
    if tracer == "fx" or isinstance(model, torch.fx.GraphModule):
        return _import_fx(model, example_inputs, input_names, output_names)
    if tracer != "export":
        raise ModelImportError(f"unknown torch tracer {tracer!r}; use 'export' or 'fx'.")
    if isinstance(model, torch.export.ExportedProgram):
        program = model
    else:
        if example_inputs is None:
            raise ModelImportError("importing a torch module needs example inputs (a tuple of tensors).")
        try:
            program = torch.export.export(model.eval(), tuple(example_inputs), dynamic_shapes=dynamic_shapes)
        except Exception as err:
            raise ModelImportError(
                f"torch.export could not trace {type(model).__name__}: {str(err).splitlines()[0]}; "
                "try tracer='fx' or make the model export-friendly."
            ) from err
    return _import_exported_program(program, input_names, output_names)


def _import_exported_program(program, input_names, output_names) -> ImportedModel:
    import torch
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    program = program.run_decompositions()
    check_torch_operators(program.graph.nodes, ExportedProgramImporter().convert_map, "torch.export")
    mod = from_exported_program(
        program,
        keep_params_as_input=True,
        unwrap_unit_return_tuple=True,
        run_ep_decomposition=False,
        custom_convert_map={"addmm.default": _addmm_in_input_dtype},
    )
    kinds = torch.export.graph_signature.InputKind
    buffers = dict(program.named_buffers())
    weight_values: dict[str, tuple[str, Any]] = {}
    user_inputs: list[str] = []
    for spec in program.graph_signature.input_specs:
        if spec.kind == kinds.USER_INPUT:
            user_inputs.append(spec.arg.name)
        elif spec.kind == kinds.PARAMETER:
            weight_values[spec.arg.name] = (spec.target, program.state_dict[spec.target])
        elif spec.kind == kinds.BUFFER:
            value = buffers[spec.target] if spec.target in buffers else program.constants[spec.target]
            weight_values[spec.arg.name] = (spec.target, value)
        elif spec.kind == kinds.CONSTANT_TENSOR:
            weight_values[spec.arg.name] = (spec.target, program.tensor_constants[spec.target])
    renames = {old: new for old, (new, _) in weight_values.items()}
    if input_names:
        renames.update(dict(zip(user_inputs, input_names)))
    func = rename_params(mod["main"], renames)
    mod["main"] = func
    input_vars, weight_vars = split_params(func)
    params = {}
    for var in weight_vars:
        old = next(o for o, (n, _) in weight_values.items() if n == var.name)
        params[var.name] = to_numpy(weight_values[old][1])
    inputs = [tensor_spec(v) for v in input_vars]
    return ImportedModel(mod, params, inputs, output_specs(func, output_names), source="torch.export")


def _import_fx(model, example_inputs, input_names, output_names) -> ImportedModel:
    import torch
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.torch import from_fx
    from tvm.relax.frontend.torch.fx_translator import TorchFXImporter

    if example_inputs is None:
        raise ModelImportError("importing with torch.fx needs example inputs for the input shapes.")
    try:
        graph_module = model if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(model)
    except Exception as err:
        raise ModelImportError(
            f"torch.fx could not trace {type(model).__name__}: {str(err).splitlines()[0]}; try tracer='export'."
        ) from err
    check_torch_operators(graph_module.graph.nodes, TorchFXImporter().convert_map, "torch.fx")
    dtypes = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.int32: "int32"}
    input_info = [(tuple(t.shape), dtypes[t.dtype]) for t in example_inputs]
    mod = from_fx(graph_module, input_info, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    mod, detached = detach_params(mod)
    input_vars, weight_vars = split_params(mod["main"])
    if input_names is None:
        signature = inspect.signature(model.forward)
        input_names = list(signature.parameters)[: len(input_vars)]
    # fx names weights by attribute path with '_' (fc1_weight); recover the state-dict names.
    state = dict(graph_module.named_parameters()) | dict(graph_module.named_buffers())
    by_flat = {name.replace(".", "_"): name for name in state}
    renames = {var.name: input_names[i] for i, var in enumerate(input_vars)}
    for var in weight_vars:
        renames[var.name] = by_flat.get(var.name, var.name)
    func = rename_params(mod["main"], renames)
    mod["main"] = func
    input_vars, weight_vars = split_params(func)
    values = detached.get("main", [])
    params = {var.name: to_numpy(v) for var, v in zip(weight_vars, values)}
    inputs = [tensor_spec(v) for v in input_vars]
    return ImportedModel(mod, params, inputs, output_specs(func, output_names), source="torch.fx")


def _addmm_in_input_dtype(node, importer):
    """aten.addmm (what nn.Linear decomposes to) in the inputs' dtype.

    TVM 0.27's translator computes it with out_dtype="float32" whatever the inputs, so a float16 model
    fails to type-check (fp16 bias + fp32 product). torch's addmm returns the inputs' dtype.
    """
    from tvm import relax

    bias, x, w = (importer.env[a] for a in node.args[:3])
    alpha, beta = node.kwargs.get("alpha", 1), node.kwargs.get("beta", 1)
    emit = importer.block_builder.emit
    product = emit(relax.op.matmul(x, w))
    if alpha != 1:
        product = emit(relax.op.multiply(product, relax.const(alpha, product.ty.dtype)))
    if beta == 0:
        return product
    if beta != 1:
        bias = emit(relax.op.multiply(bias, relax.const(beta, bias.ty.dtype)))
    return emit(relax.op.add(bias, product))


def check_torch_operators(nodes, convert_map: dict, frontend: str) -> None:
    """Fail naming the first operator the Relax translator cannot take, and where it comes from."""
    for node in nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name in convert_map:
            continue
        where = _source_location(node)
        raise UnsupportedOperatorError(
            f"operator {name!r} (node {node.name!r}{where}) is not supported by tensorpress's {frontend} "
            "frontend; rewrite that part of the model with supported operators."
        )


def _source_location(node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [line.strip() for line in trace.splitlines() if line.strip().startswith("File ")]
    return f", from {lines[-1]}" if lines else ""
