"""Graph passes: each a callable ImportedModel -> ImportedModel, one per file, named for its effect.

A pass sees the Relax module and the weights together (the weight passes repack weights as they rewrite
the graph; the numerics passes change the module alone). `compiler/pipeline.py` is the one place that
orders them; the build after them only lowers (TVM's own passes) and schedules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tensorpress.imported_model import ImportedModel

GraphPass = Callable[[ImportedModel], ImportedModel]


def on_module(tvm_pass: Any, name: str) -> GraphPass:
    """A pass of TVM's (an IRModule -> IRModule transform) as a graph pass: the weights are unchanged."""

    def graph_pass(model: ImportedModel) -> ImportedModel:
        return model.with_module(tvm_pass(model.mod))

    graph_pass.__name__ = name
    return graph_pass


def binding_readers(func: Any) -> dict[Any, list[Any]]:
    """var -> the variable of each binding of the Relax function `func` that reads it, once per read
    (None where the function's result reads it): how a pass tells a value it may consume alone."""
    from tvm import relax

    def vars_in(expr: Any) -> list[Any]:
        found: list[Any] = []
        relax.analysis.post_order_visit(expr, lambda e: found.append(e) if isinstance(e, relax.Var) else None)
        return found

    readers: dict[Any, list[Any]] = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            for var in vars_in(binding.value):
                readers.setdefault(var, []).append(binding.var)
    for var in vars_in(func.body.body):
        readers.setdefault(var, []).append(None)
    return readers
