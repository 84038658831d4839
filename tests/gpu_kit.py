"""What the Tensor Core GEMM gpu tests share: the GPU kit holding their kernels, and the device.

Kernels come from the prepared kit (TENSORPRESS_GPU_KIT, set by `benchmarks/kit/run.py` on the GPU
machine, where TVM's compiler is absent) or, without a kit, are built now into a temp folder (a GPU
machine with TVM and nvcc). A dry kit runs the same tests on the CPU with CPU-built kernels. Imports
neither torch nor TVM at module level.

Where a CUDA device is visible, the GPU tests must run: a kit that is missing, or that cannot be
built here (no TVM), fails the collection loudly (`require_cases`) instead of skipping every test.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
from conftest import cuda_device_visible  # the gpu marker's own test: nvidia-smi -L lists a GPU

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks.kit` is imported from the repository root
    sys.path.insert(0, str(ROOT))

KIT = os.environ.get("TENSORPRESS_GPU_KIT")
MANIFEST = json.loads((Path(KIT) / "manifest.json").read_text()) if KIT else None
DRY = bool(MANIFEST and MANIFEST["dry"])
DEFAULT_TOKENS = [1, 2, 7, 16, 17, 31, 64, 100, 130]


def fail_where_cuda_is_visible(why: str) -> None:
    """Fail the collection (loudly, not a skip) when a CUDA device is visible; else return."""
    if cuda_device_visible():
        pytest.fail(
            f"a CUDA device is visible but {why}; prepare the GPU kit (benchmarks/kit/run.py sets "
            "TENSORPRESS_GPU_KIT) or install TVM with nvcc so the kernels can be built here.",
            pytrace=False,
        )


def require_cases(section: str, build_names: Callable[[], list[str]]) -> list[str]:
    """The case names of a GEMM gpu test file: the kit's `section` cases, else `build_names()` (needs
    TVM). With neither, none where no CUDA device is visible; where one is, the collection fails."""
    if MANIFEST:
        names = list(MANIFEST.get(section, {}).get("cases", []))
        if not names:
            fail_where_cuda_is_visible(f"the GPU kit at {KIT} has no {section!r} cases")
        return names
    try:
        names = build_names()
    except ImportError as err:
        fail_where_cuda_is_visible(f"there is no GPU kit and the kernels cannot be built here ({err})")
        return []
    if not names:
        fail_where_cuda_is_visible(f"the kernel builder lists no {section!r} cases")
    return names


@cache
def kernel_kit():
    """The kit holding the test kernels: the prepared one, or one built now (once per process)."""
    from benchmarks.kit.kernels import KernelKit

    if KIT:
        return KernelKit(KIT)
    import tempfile

    import torch

    from benchmarks.kit.prepare import prepare

    folder = Path(tempfile.mkdtemp(prefix="tensorpress-gpu-kit-"))
    arch = "sm_{}{}".format(*torch.cuda.get_device_capability())
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    prepare(folder / "kit", "sm_90a" if arch == "sm_90" else arch, False, python, layers=["none"])
    return KernelKit(folder / "kit")


def tokens(section: str) -> list[int]:
    """The token counts N the kit's `section` ("tests", "fpx_tests") was built for."""
    return MANIFEST[section]["tokens"] if MANIFEST else DEFAULT_TOKENS


def device():
    import torch

    return torch.device("cpu" if DRY else "cuda")
