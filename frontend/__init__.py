"""Importers: a model file, folder or torch module -> `ImportedModel` (Relax + named weights)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tensorpress.errors import ConfigError, ModelImportError
from tensorpress.imported_model import ImportedModel, TensorSpec

SUPPORTED_FILES = ".onnx file, .pt2 file (torch.export.save), or Hugging Face model folder"


def import_model(
    model: Any,
    *,
    example_inputs: tuple | None = None,
    input_shapes: dict[str, list[int | str]] | None = None,
    dtype: str | None = None,
    tracer: str = "export",
    **options: Any,
) -> ImportedModel:
    """Import `model`: a path (.onnx, .pt2, HF folder), an onnx.ModelProto, a torch.nn.Module (with
    `example_inputs`), a torch.export.ExportedProgram or a torch.fx.GraphModule.

    dtype: None keeps the model's own dtype (decoders: float32); "float16"/"float32" casts torch and
    Hugging Face models before they are traced.
    """
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.is_dir():
            from tensorpress.frontend.hf_folder import import_hf_folder

            return import_hf_folder(path, dtype=dtype, **options)
        if path.suffix == ".onnx" and path.exists():
            from tensorpress.frontend.onnx_decoder import import_onnx_decoder, is_onnx_decoder

            if is_onnx_decoder(path):  # a causal LM exported with past_key_values
                return import_onnx_decoder(path, dtype=dtype, **options)
        if dtype not in (None, "float32") and path.suffix == ".onnx":
            raise ConfigError(
                f"{path}: ONNX graphs compile in the dtype they were exported in; export it in {dtype} "
                "(linear layers on CUDA run on fp16 Tensor Cores either way)."
            )
        if not path.exists():
            raise ModelImportError(f"model {path} does not exist; pass a {SUPPORTED_FILES}.")
        if path.suffix == ".onnx":
            from tensorpress.frontend.onnx_importer import import_onnx

            return import_onnx(path, input_shapes)
        if path.suffix == ".pt2":
            import torch

            from tensorpress.frontend.torch_importer import import_torch

            try:
                program = torch.export.load(str(path))
            except Exception as err:
                raise ModelImportError(f"{path} could not be read as a torch.export program: {err}.") from err
            return import_torch(program, dtype=dtype)
        raise ModelImportError(f"{path} has an unknown model type {path.suffix!r}; pass a {SUPPORTED_FILES}.")
    if type(model).__module__.startswith("onnx"):
        from tensorpress.frontend.onnx_importer import import_onnx

        if dtype not in (None, "float32"):
            raise ConfigError("ONNX graphs compile in the dtype they were exported in; export the model in float16.")
        return import_onnx(model, input_shapes)
    if type(model).__module__.startswith("torch") or hasattr(model, "state_dict"):
        from tensorpress.frontend.torch_importer import import_torch

        return import_torch(model, example_inputs, tracer=tracer, dtype=dtype)
    raise ModelImportError(f"cannot import a {type(model).__name__}; pass a {SUPPORTED_FILES}, or a torch module.")


__all__ = ["ImportedModel", "TensorSpec", "import_model"]
