"""Hugging Face model folders (config.json + *.safetensors) -> ImportedModel.

Decoder LLM architectures go to `hf_decoder` (prefill/decode with a paged KV cache). Every other
architecture that `transformers` can build (BERT-family encoders, ...) is built from its config with the
weights of the folder, and exported through torch.export with dynamic batch and sequence dimensions:
main(input_ids, attention_mask[, token_type_ids]) -> last_hidden_state.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

from tensorpress.errors import ModelImportError
from tensorpress.frontend.relax_params import output_specs, rename_params, rename_symbolic_dims, tensor_spec
from tensorpress.imported_model import ImportedModel


def read_hf_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelImportError(f"{folder} is not a Hugging Face model folder: it has no config.json.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelImportError(f"{path} is not valid JSON (line {err.lineno}): {err.msg}.") from err


def is_decoder_folder(folder: str | os.PathLike) -> bool:
    from tensorpress.frontend.hf_decoder import SUPPORTED_ARCHITECTURES

    architectures = read_hf_config(folder).get("architectures") or []
    return bool(architectures) and architectures[0] in SUPPORTED_ARCHITECTURES


def import_hf_folder(folder: str | os.PathLike, dtype: str | None = None, **decoder_options) -> ImportedModel:
    """Import a Hugging Face folder: decoders through hf_decoder, everything else as an encoder graph."""
    config = read_hf_config(folder)
    if not decoder_options.get("shapes_only") and not list(Path(folder).glob("*.safetensors")):
        # an optimum export: config.json beside a decoder exported with its cache (model.onnx, or the
        # older decoder_model_merged / decoder_with_past_model files; only their weights are used)
        from tensorpress.frontend.onnx_decoder import import_onnx_decoder, is_onnx_decoder

        preferred = ("model.onnx", "decoder_model_merged.onnx", "decoder_with_past_model.onnx")
        onnx_files = sorted(Path(folder).glob("*.onnx"), key=lambda f: (f.name not in preferred, f.name))
        for onnx_file in onnx_files:
            if is_onnx_decoder(onnx_file):
                return import_onnx_decoder(onnx_file, dtype=dtype, **decoder_options)
        raise ModelImportError(f"{folder} has no *.safetensors weights; save the model with safetensors.")
    architectures = config.get("architectures") or []
    if architectures and architectures[0].endswith(("ForCausalLM", "LMHeadModel")):
        from tensorpress.frontend.hf_decoder import import_hf_decoder

        return import_hf_decoder(folder, dtype=dtype, **decoder_options)
    return import_hf_encoder(folder, dtype or "float32")


def import_hf_encoder(folder: str | os.PathLike, dtype: str = "float32") -> ImportedModel:
    import torch

    from tensorpress.frontend.torch_importer import import_torch

    transformers = _transformers()
    try:
        model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:
        raise ModelImportError(
            f"transformers could not build the model in {folder}: {str(err).splitlines()[0]}."
        ) from err
    model = (model.half() if dtype == "float16" else model.float()).eval()
    names = ["input_ids", "attention_mask"]
    if getattr(model.config, "type_vocab_size", 0):
        names.append("token_type_ids")

    takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    class LastHiddenState(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            kwargs = dict(zip(names, args))
            if takes_positions:
                # Explicit positions keep the sequence length symbolic: HF slices a 512-long buffer
                # instead, whose min(seq, 512) length Relax cannot match against seq.
                kwargs["position_ids"] = torch.arange(args[0].shape[1], device=args[0].device).unsqueeze(0)
            return self.inner(**kwargs).last_hidden_state

    batch, seq = (
        torch.export.Dim("batch", max=4096),
        torch.export.Dim("seq", max=model.config.max_position_embeddings),
    )
    example = tuple(torch.ones(2, 8, dtype=torch.int64) for _ in names)
    dynamic = tuple({0: batch, 1: seq} for _ in names)
    imported = import_torch(
        LastHiddenState(model),
        example,
        input_names=names,
        output_names=["last_hidden_state"],
        dynamic_shapes=(dynamic,),
    )
    # Weights lose the wrapper's "inner." prefix so users see the folder's own names.
    imported.params = {_strip(k): v for k, v in imported.params.items()}
    func = rename_params(imported.mod["main"], {v.name: _strip(v.name) for v in imported.mod["main"].params})
    batch_dim, seq_dim = imported.inputs[0].shape
    func = rename_symbolic_dims(func, {str(batch_dim): "batch", str(seq_dim): "seq"})
    imported.mod["main"] = func
    num_input = len(names)
    imported.inputs = [tensor_spec(v) for v in list(func.params)[:num_input]]
    imported.outputs = output_specs(func, ["last_hidden_state"])
    imported.source = f"hf:{folder}"
    imported.info = {"architecture": type(model).__name__, "hf_folder": str(Path(folder).resolve()), "dtype": dtype}
    return imported


def _strip(name: str) -> str:
    return name[len("inner.") :] if name.startswith("inner.") else name


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return transformers
