"""RewriteLinearToWeightGemm's epilogue fusion: on the CPU a linear read only by a GELU or by a residual add
compiles to one weight-GEMM kernel computing that op in its store, and the model still matches torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tensorpress


class LinearResidual(torch.nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.linear = torch.nn.Linear(features, features)

    def forward(self, x):
        return x + self.linear(x)


class LinearGelu(torch.nn.Module):
    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.linear = torch.nn.Linear(features, hidden)

    def forward(self, x):
        return torch.nn.functional.gelu(self.linear(x))


class LinearReadTwice(torch.nn.Module):
    """The linear's result feeds the residual add and another op: fusing would compute the GEMM twice."""

    def __init__(self, features: int):
        super().__init__()
        self.linear = torch.nn.Linear(features, features)

    def forward(self, x):
        y = self.linear(x)
        return (x + y) * torch.sigmoid(y)


def _compile_and_compare(module: torch.nn.Module, shape, tmp_path, weights=None):
    torch.manual_seed(0)
    module = module.eval()
    x = torch.randn(*shape)
    report = tensorpress.compile(
        module, tmp_path / "m.tpk", example_inputs=(x,), target="cpu", weights=weights, tuning_log=False
    )
    model = tensorpress.runtime.load(report.artifact, device="cpu")
    with torch.no_grad():
        want = module(x).numpy()
    (got,) = model.run({model.signature.inputs[0].name: x.numpy()})
    tol = 1e-4 if weights is None else 5e-2  # FPx weights: the stored weights differ from torch's
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    return report.manifest["kernels"]


def _weight_gemms(kernels: list[str]) -> list[str]:
    return [k for k in kernels if k.startswith("weight_gemm")]


@pytest.mark.parametrize("shape", [(2, 7, 32), (5, 32)])
def test_linear_and_residual_compile_to_one_kernel(shape, tmp_path):
    kernels = _compile_and_compare(LinearResidual(32), shape, tmp_path)
    (gemm,) = _weight_gemms(kernels)
    assert "_bias_residual" in gemm
    assert [k for k in kernels if not k.startswith("weight_gemm")] == [], kernels  # no add kernel left


@pytest.mark.parametrize("weights", [None, "fp6"])
def test_linear_and_gelu_compile_to_one_kernel(weights, tmp_path):
    kernels = _compile_and_compare(LinearGelu(32, 64), (2, 7, 32), tmp_path, weights)
    (gemm,) = _weight_gemms(kernels)
    assert "_gelu" in gemm
    assert [k for k in kernels if not k.startswith("weight_gemm")] == [], kernels  # no erf kernel left


def test_a_linear_read_twice_is_not_fused(tmp_path):
    kernels = _compile_and_compare(LinearReadTwice(32), (2, 7, 32), tmp_path)
    (gemm,) = _weight_gemms(kernels)
    assert "_residual" not in gemm
