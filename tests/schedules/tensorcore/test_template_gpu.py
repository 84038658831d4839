"""The Tensor Core kernels on a GPU against torch (cuBLAS and an fp32 reference), for a grid of N, M, K.

Runs with `pytest -m gpu` where a CUDA device is visible (skipped elsewhere). Kernels come from a
prepared GPU kit (TENSORPRESS_GPU_KIT, set by benchmarks/kit/run.py on the GPU machine, where TVM's
compiler is absent) or, without a kit, are built now (a GPU machine with TVM and nvcc). In the kit's
dry run (a kit prepared with --dry) the same tests run on the CPU with CPU-built kernels.
This file imports neither TVM nor tensorpress's compiler at module level.
"""

from __future__ import annotations

import re

import pytest
from gpu_kit import DRY, device, kernel_kit, require_cases
from gpu_kit import tokens as kit_tokens

torch = pytest.importorskip("torch")

pytestmark = [] if DRY else [pytest.mark.gpu]
TOLERANCE = 2e-3


def _case_names() -> list[str]:
    def build_names() -> list[str]:
        from benchmarks.kit.build import test_cases

        return [c.name for c in test_cases(dry=False)]

    # no kit and no TVM: nothing to collect, except where a CUDA device is visible (then it fails)
    return require_cases("tests", build_names)


def tokens() -> list[int]:
    return kit_tokens("tests")


def inputs(case, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, case.k, generator=g).to(torch.float16)
    w = (torch.randn(case.m, case.k, generator=g) / case.k**0.5).to(torch.float16)
    b = torch.randn(case.m, generator=g).to(torch.float16) if case.bias else None
    return [t.to(device()) if t is not None else None for t in (x, w, b)]


def reference(x, w, b):
    y = x.float() @ w.float().t()
    return y + b.float() if b is not None else y


def rel_error(out, ref) -> float:
    out = out.float()
    assert torch.isfinite(out).all(), "NaN/Inf in the output: an element was not written"
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("name", _case_names())
def test_kernel_matches_torch_for_every_token_count(name):
    kit = kernel_kit()
    case = kit.case(name)
    for n in tokens():
        x, w, b = inputs(case, n, seed=n)
        y = torch.full((n, case.m), float("nan"), dtype=torch.float16, device=device())
        kit.run(case, x, [w], bias=b, out=y)
        ref = reference(x, w, b)
        assert rel_error(y, ref) < TOLERANCE, (name, n)
        if not DRY:  # and agrees with cuBLAS as closely as cuBLAS agrees with the fp32 reference
            cublas = torch.nn.functional.linear(x, w, b)
            assert rel_error(y, cublas.float()) < 2 * TOLERANCE, (name, n)


@pytest.mark.parametrize("name", [n for n in _case_names() if re.search(r"sk(\d+)", n).group(1) != "1"])
def test_split_k_kernels_are_bit_for_bit_deterministic(name):
    kit = kernel_kit()
    case = kit.case(name)
    x, w, b = inputs(case, 37, seed=1)
    outputs = [kit.run(case, x, [w], bias=b) for _ in range(3)]
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])
