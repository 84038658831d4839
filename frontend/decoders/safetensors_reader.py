"""Read the tensors of a Hugging Face folder's *.safetensors files into numpy, bf16 included.

numpy has no bfloat16 and safetensors' numpy loader refuses it, so this uses the runtime's own
zero-copy reader (`tensorpress.runtime.artifact.read_safetensors`), which widens bf16 to float32 exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tensorpress.errors import ModelImportError
from tensorpress.runtime.artifact import read_safetensors


def read_safetensors_folder(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of all *.safetensors files in `folder` (sharded checkpoints included), by name."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelImportError(f"{folder}: no *.safetensors weights found (save with safetensors).")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            tensors.update(read_safetensors(f))
        except ValueError as err:
            raise ModelImportError(f"{f}: {err}; re-save the checkpoint with safetensors.") from None
    return tensors
