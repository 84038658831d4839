"""The tensorpress runtime: load an artifact and run it, with TVM's runtime and numpy only.

    model = tensorpress.runtime.load("model.tpk", device="cpu")      # or "cuda:0"
    outputs = model.run({"input_ids": ids, "attention_mask": mask})   # list of numpy arrays
    model.signature                                                   # input/output names, shapes, dtypes

Decoder artifacts load as a `DecoderModel` with `generate()`. Nothing here imports torch or TVM's
compiler (a test checks it in a fresh process), so a runtime bundle (`tensorpress package`) runs it.

Concurrency contract: a loaded model (GraphModel or DecoderModel) may be shared by any number of
threads, and its methods called from them at once. Each thread runs the compiled functions on its
own VM state (made on its first call; the weights and code are shared, not copied), so calls of
different threads run in parallel and give exactly what they give alone. A DecoderModel's threads
share its KV page pool: the pool's bookkeeping takes a lock, a thread's sequences never share pages
with another's, and a prompt that does not fit waits until other threads' sequences give pages
back. One generate_stream iterator belongs to the thread that iterates it; `last_stats` is per
thread. (One lock around a single VM was measured against this: benchmarks/runtime_threads_cpu.py.)
"""

from __future__ import annotations

import os
from typing import Any


def load(
    path: str | os.PathLike,
    device: str = "cpu",
    verify: bool = True,
    weights: dict[str, Any] | None = None,
    **decoder_options: Any,
) -> Any:
    """Load an artifact on `device` ("cpu", "cuda", "cuda:N"): a GraphModel, or a DecoderModel.

    `verify` checks every part's sha256 (reads the whole file once). `weights` ({name: numpy array, or
    a DLPack tensor already on the device}) replaces the stored weights; an artifact compiled with
    store_weights=False needs it. Decoders take the KV-cache options of `DecoderModel`
    (max_total_tokens=..., memory_fraction=...). Raises ArtifactError / DeviceMismatchError /
    InputError with one sentence when the file is bad, built for another device, or the weights do
    not fit it.
    """
    from tensorpress.runtime.loaded_artifact import load_artifact  # here: `import tensorpress` stays light

    loaded = load_artifact(path, device, verify=verify, weights=weights)
    if loaded.manifest.get("kind") == "decoder":
        from tensorpress.runtime.decoder import DecoderModel

        return DecoderModel(loaded, **decoder_options)
    if decoder_options:
        raise TypeError(f"{path} is not a decoder; options {sorted(decoder_options)} do not apply.")
    from tensorpress.runtime.graph_model import GraphModel

    return GraphModel(loaded)


__all__ = ["load"]
