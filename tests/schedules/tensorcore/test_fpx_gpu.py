"""The FPx Tensor Core kernels on a GPU against torch: X · decode(W)ᵀ in fp32 and cuBLAS on the same fp16
weight values, for every test format, shipped tile, split-K and a grid of N.

Runs with `pytest -m gpu` where a CUDA device is visible (skipped elsewhere). Kernels come from the
prepared GPU kit (TENSORPRESS_GPU_KIT; `benchmarks/kit/run.py` sets it) or, without a kit, are built
now. In the kit's dry run the same tests run on the CPU with CPU-built kernels. Weights are packed
with `tensorpress.compiler.formats` (numpy), which the kit carries. No TVM at module level.
"""

from __future__ import annotations

import re
from functools import cache

import pytest
from gpu_kit import DRY, device, kernel_kit, require_cases
from gpu_kit import tokens as kit_tokens

torch = pytest.importorskip("torch")

pytestmark = [] if DRY else [pytest.mark.gpu]
TOLERANCE = 2e-3


def _case_names() -> list[str]:
    def build_names() -> list[str]:
        from benchmarks.kit.build import fpx_test_cases

        return [c.name for c in fpx_test_cases(dry=False)]

    # no kit and no TVM: nothing to collect, except where a CUDA device is visible (then it fails)
    return require_cases("fpx_tests", build_names)


def tokens() -> list[int]:
    return kit_tokens("fpx_tests")


@cache
def weight(fmt: str, m: int, k: int):
    from benchmarks.kit.weights import make_weight

    return make_weight(fmt, m, k, device(), seed=m + k)


def rel_error(out, ref) -> float:
    out = out.float()
    assert torch.isfinite(out).all(), "NaN/Inf in the output: an element was not written"
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("name", _case_names())
def test_fpx_kernel_matches_torch_for_every_token_count(name):
    kit = kernel_kit()
    case = kit.case(name)
    w = weight(case.fmt, case.m, case.k)
    for n in tokens():
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, case.k, generator=g).to(torch.float16).to(device())
        b = torch.randn(case.m, generator=g).to(torch.float16).to(device()) if case.bias else None
        y = torch.full((n, case.m), float("nan"), dtype=torch.float16, device=device())
        kit.run(case, x, w.stored, bias=b, out=y)
        ref = x.float() @ w.dense.float().t() + (b.float() if b is not None else 0)
        assert rel_error(y, ref) < TOLERANCE, (name, n)
        if not DRY:  # and agrees with cuBLAS on the same fp16 weights as closely as cuBLAS agrees with fp32
            cublas = torch.nn.functional.linear(x, w.dense, b)
            assert rel_error(y, cublas.float()) < 2 * TOLERANCE, (name, n)


@pytest.mark.parametrize("name", [n for n in _case_names() if re.search(r"sk(\d+)", n).group(1) != "1"])
def test_fpx_split_k_kernels_are_bit_for_bit_deterministic(name):
    kit = kernel_kit()
    case = kit.case(name)
    w = weight(case.fmt, case.m, case.k)
    x = torch.randn(37, case.k, generator=torch.Generator().manual_seed(1)).to(torch.float16).to(device())
    outputs = [kit.run(case, x, w.stored) for _ in range(3)]
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])
