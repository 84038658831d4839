"""Turning a frontend's Relax "main" into the ImportedModel convention.

Frontends disagree on what they do with weights (ONNX keeps initializers as trailing parameters,
torch.export names them `p_fc1_weight`, torch.fx sorts them). Here every frontend's output is brought
to one form: main(inputs..., weights...) with attribute num_input, weights named by the model's own
names (`fc1.weight`), their values in an ordered dict in the same order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax

from tensorpress.imported_model import TensorSpec


def is_model_function(func: relax.Function) -> bool:
    """Whether `func` follows the convention above (attribute num_input): main, a decoder's prefill/decode."""
    return func.attrs is not None and "num_input" in func.attrs


def split_params(func: relax.Function) -> tuple[list[relax.Var], list[relax.Var]]:
    """(inputs, weights) of a function: the first `num_input` parameters are the model's inputs, the rest
    its weights. A function without num_input is not a model function (a helper a frontend or pass made):
    all its parameters are inputs, it has no weights."""
    params = list(func.params)
    if not is_model_function(func):
        return params, []
    num_input = int(func.attrs["num_input"])
    return params[:num_input], params[num_input:]


def rename_params(func: relax.Function, new_names: dict[str, str]) -> relax.Function:
    """Return `func` with parameters renamed (old name -> new name); others keep their names."""
    new_params, mapping = [], {}
    for var in func.params:
        if var.name in new_names:
            fresh = relax.Var(new_names[var.name], var.ty)
            mapping[var] = fresh
            new_params.append(fresh)
        else:
            new_params.append(var)
    if not mapping:
        return func
    body = func.bind_params(mapping).body
    return relax.Function(new_params, body, func.ret_ty, func.is_pure, func.attrs)


def rename_symbolic_dims(func: relax.Function, new_names: dict[str, str]) -> relax.Function:
    """Return `func` with symbolic shape variables renamed (e.g. torch's `s21` -> `batch`)."""
    present = {str(v): v for v in relax.analysis.defined_symbolic_vars(func)}
    binding = {present[old]: tvm.tirx.Var(new, "int64") for old, new in new_names.items() if old in present}
    return func.bind_symbolic_vars(binding) if binding else func


def tensor_spec(var: relax.Var, name: str | None = None) -> TensorSpec:
    """TensorSpec of a Relax tensor var; symbolic dims become their variable names."""
    ty = var.ty
    shape: list[int | str] = []
    for dim in ty.shape.values:
        shape.append(int(dim) if isinstance(dim, tvm.tirx.IntImm) else str(dim))
    return TensorSpec(name or var.name, tuple(shape), str(ty.dtype))


def output_specs(func: relax.Function, names: list[str] | None = None) -> list[TensorSpec]:
    """TensorSpecs of main's outputs (a tensor or a tuple of tensors)."""
    ret = func.ret_ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    specs = []
    for i, ty in enumerate(fields):
        if not isinstance(ty, relax.TensorType) or ty.ndim < 0:
            raise ValueError("model outputs must be tensors with a known rank")
        if ty.shape is None:
            shape: list[int | str] = ["?"] * ty.ndim
        else:
            shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in ty.shape.values]
        name = names[i] if names and i < len(names) else f"output_{i}"
        specs.append(TensorSpec(name, tuple(shape), str(ty.dtype)))
    return specs


def to_numpy(value: Any) -> np.ndarray:
    """A weight value from any frontend (tvm Tensor, torch tensor, numpy) as a numpy array."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # torch
        return value.detach().cpu().contiguous().numpy()
    return value.numpy()
