"""tensorpress: a compiler, on Apache TVM, for compressed LLM inference on NVIDIA Tensor Cores.

    import tensorpress
    artifact = tensorpress.compile("model.onnx", "model.tpk", target="cpu")
    model = tensorpress.runtime.load("model.tpk", device="cpu")
    outputs = model.run({"x": x})

Importing this package is cheap: TVM, torch and the compiler load only when first used, so the
runtime (which must never pull in the compiler) and `tensorpress --help` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# TVM's CPU pool defaults to half the logical CPUs, pinned; before TVM makes it, size it from the CPUs
# this process may use and leave its workers unpinned (runtime/cpu_threads.py). User settings are kept.
from tensorpress.runtime.cpu_threads import set_thread_pool_defaults  # standard library only

set_thread_pool_defaults()

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "compile": "tensorpress.compiler.api",
    "tune": "tensorpress.compiler.tuning.tune_model",
    "calibrate": "tensorpress.compiler.calibration.kv_rotations",
    "FPxConfig": "tensorpress.compiler.compression_configs",
    "SparseConfig": "tensorpress.compiler.compression_configs",
    "KVCacheConfig": "tensorpress.compiler.compression_configs",
    "runtime": "tensorpress.runtime",
    "TensorpressError": "tensorpress.errors",
}

if TYPE_CHECKING:
    from tensorpress import runtime as runtime
    from tensorpress.compiler.api import compile as compile
    from tensorpress.compiler.calibration.kv_rotations import calibrate as calibrate
    from tensorpress.compiler.compression_configs import FPxConfig as FPxConfig
    from tensorpress.compiler.compression_configs import KVCacheConfig as KVCacheConfig
    from tensorpress.compiler.compression_configs import SparseConfig as SparseConfig
    from tensorpress.compiler.tuning.tune_model import tune as tune
    from tensorpress.errors import TensorpressError as TensorpressError


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'tensorpress' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value


__all__ = sorted(_LAZY) + ["__version__"]
