"""The bitmap sparse-weight Tensor Core kernels on a GPU against numpy: X · unpack(W)ᵀ in float64, for the
shipped tiles (split-K too), 50 % and 80 % random sparsity and a grid of N.

Runs with `pytest -m gpu` where a CUDA device is visible (skipped elsewhere). Kernels come from the
prepared GPU kit (TENSORPRESS_GPU_KIT; `benchmarks/kit/run.py` sets it) or, without a kit, are built
now. In the kit's dry run the same tests run on the CPU with CPU-built kernels. Weights are pruned at
random and packed with `tensorpress.compiler.formats.bitmap` (numpy), which the kit carries; the
kernels' "values" buffer has the kit's fixed capacity, so the packed values are padded with zeros.
No TVM at module level.
"""

from __future__ import annotations

import re
from functools import cache

import numpy as np
import pytest
from gpu_kit import DRY, device, kernel_kit, require_cases
from gpu_kit import tokens as kit_tokens

torch = pytest.importorskip("torch")

pytestmark = [] if DRY else [pytest.mark.gpu]
TOLERANCE = 2e-3
SPARSITIES = (0.5, 0.8)


def _case_names() -> list[str]:
    def build_names() -> list[str]:
        from benchmarks.kit.build import bitmap_test_cases

        return [c.name for c in bitmap_test_cases(dry=False)]

    return require_cases("bitmap_tests", build_names)


@cache
def weight(m: int, k: int, sparsity: float):
    """(the kernel's buffers, numpy's unpack(W) in float64), on the device: a random prune, numpy-packed."""
    from benchmarks.kit.cases import bitmap_value_capacity, kept_per_row
    from tensorpress.compiler.formats import get_weight_format

    rng = np.random.default_rng(m + k + int(100 * sparsity))
    w = rng.standard_normal((m, k)).astype(np.float32) / np.sqrt(k)
    drop = np.argsort(rng.random((m, k)), axis=1)[:, kept_per_row(k, sparsity) :]
    np.put_along_axis(w, drop, 0.0, axis=1)
    fmt = get_weight_format("bitmap")
    packed = fmt.pack(w)
    values = np.zeros(bitmap_value_capacity(m, k), np.float16)
    values[: packed.arrays["values"].size] = packed.arrays["values"]
    arrays = [packed.arrays["bits"], packed.arrays["offsets"], values]
    stored = [torch.from_numpy(np.ascontiguousarray(a)).to(device()) for a in arrays]
    return stored, torch.from_numpy(fmt.unpack(packed)).double().to(device())


def rel_error(out, ref) -> float:
    out = out.double()
    assert torch.isfinite(out).all(), "NaN/Inf in the output: an element was not written"
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("name", _case_names())
def test_bitmap_kernel_matches_numpy_for_every_token_count(name, sparsity):
    kit = kernel_kit()
    case = kit.case(name)
    stored, dense = weight(case.m, case.k, sparsity)
    from benchmarks.kit.cases import kept_per_row

    assert int(torch.count_nonzero(dense)) == case.m * kept_per_row(case.k, sparsity)  # pruned as asked
    for n in kit_tokens("bitmap_tests"):
        rng = np.random.default_rng(n)
        x = rng.standard_normal((n, case.k)).astype(np.float16)
        b = rng.standard_normal(case.m).astype(np.float16) if case.bias else None
        y = torch.full((n, case.m), float("nan"), dtype=torch.float16, device=device())
        x, b = (torch.from_numpy(a).to(device()) if a is not None else None for a in (x, b))
        kit.run(case, x, stored, bias=b, out=y)
        ref = x.double() @ dense.t() + (b.double() if b is not None else 0)  # float64 over numpy's unpack(W)
        assert rel_error(y, ref) < TOLERANCE, (name, sparsity, n)


@pytest.mark.parametrize("name", [n for n in _case_names() if re.search(r"sk(\d+)", n).group(1) != "1"])
def test_bitmap_split_k_kernels_are_bit_for_bit_deterministic(name):
    kit = kernel_kit()
    case = kit.case(name)
    stored, _ = weight(case.m, case.k, 0.8)
    x = torch.randn(37, case.k, generator=torch.Generator().manual_seed(1)).to(torch.float16).to(device())
    b = torch.randn(case.m, generator=torch.Generator().manual_seed(2)).half().to(device()) if case.bias else None
    outputs = [kit.run(case, x, stored, bias=b) for _ in range(3)]
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])
