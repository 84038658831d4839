"""tensorpress as a backend of ONNX's own conformance runner (`onnx.backend.test.BackendTest`).

    prepare(model)   compile the ModelProto for the CPU into an artifact, load it with the runtime
    rep.run(inputs)  run the artifact on the graph's inputs (a list, in graph order)

Artifacts are cached by the model's bytes for the length of the process (the runner prepares the same
model once per data set), in one temporary folder removed at exit.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep

import tensorpress

_FOLDER = Path(tempfile.mkdtemp(prefix="tensorpress-onnx-backend-"))
atexit.register(shutil.rmtree, _FOLDER, ignore_errors=True)
_PREPARED: dict[str, Any] = {}


class TensorpressRep(BackendRep):
    """A compiled, loaded artifact; `run` takes the inputs as a list in graph order (or a name dict)."""

    def __init__(self, model: Any):
        self.model = model

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        arrays = inputs if isinstance(inputs, dict) else [np.asarray(x) for x in inputs]
        return tuple(self.model.run(arrays))


class TensorpressBackend(Backend):
    """Compiles each model for the CPU with `tensorpress.compile`; a model tensorpress cannot compile
    raises a TensorpressError (one sentence), which the conformance runner reports as that test's error."""

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> TensorpressRep:
        data = model.SerializeToString()
        key = hashlib.sha256(data).hexdigest()[:24]
        if key not in _PREPARED:
            report = tensorpress.compile(model, _FOLDER / f"{key}.tpk", target="cpu")
            _PREPARED[key] = tensorpress.runtime.load(report.artifact)
        return TensorpressRep(_PREPARED[key])

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"


def classify(model, data_sets, rtol: float, atol: float) -> tuple[str, str]:
    """(outcome, first line of the reason) for one case: "passed", "refused" (a TensorpressError: one
    sentence), "wrong" (ran, did not match the reference within rtol/atol) or "crashed" (anything else)."""
    from onnx.backend.test.runner import Runner

    from tensorpress.errors import TensorpressError

    try:
        rep = TensorpressBackend.prepare(model)
        for inputs, outputs in data_sets:
            got = list(rep.run(inputs))
            try:
                Runner.assert_similar_outputs(outputs, got, rtol=rtol, atol=atol)
            except AssertionError as err:
                return "wrong", (str(err).strip().splitlines() or [""])[0][:200]
    except TensorpressError as err:
        return "refused", str(err)[:300]
    except Exception as err:  # noqa: BLE001 - an internal error is what this report counts
        return "crashed", f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[-1][:200]}"
    return "passed", ""
