"""What every frontend hands to the compiler, and every graph pass hands to the next: a Relax module
whose weights are named parameters. It lives at the package root so that the frontend (which makes it)
and the compiler (whose passes and build use it) both import it without one importing the other.

    ImportedModel
      mod      IRModule; each entry function takes its runtime inputs first, then the weights it
               uses, in `params` order (attribute "num_input" = number of runtime inputs)
      params   {name: numpy array}, insertion-ordered like the trailing parameters of the functions
      inputs   TensorSpec of each runtime input of "main" (symbolic dims are strings, e.g. "batch")
      outputs  TensorSpec of each output of "main"
      kind     "graph" (one function "main") or "decoder" (prefill/decode + a paged KV cache)
      info     free-form facts the compiler and runtime need (architecture, tokenizer folder, ...)

Weights stay parameters, never inlined constants, so passes can find them by name and repack them,
and the artifact can store them once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (int or symbolic-dimension name per axis) and dtype of one tensor."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TensorSpec:
        return TensorSpec(d["name"], tuple(d["shape"]), d["dtype"])


@dataclass
class ImportedModel:
    mod: Any  # tvm.IRModule (kept Any so this module imports without TVM)
    params: dict[str, np.ndarray]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    kind: str = "graph"
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def with_module(self, mod: Any, params: dict[str, np.ndarray] | None = None) -> ImportedModel:
        """This model with another module (and, for passes that repack weights, other params)."""
        return dataclasses.replace(self, mod=mod, params=self.params if params is None else params)
