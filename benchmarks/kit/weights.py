"""Weights for the kit's kernels: what a case's kernel takes, and the dense fp16 W it stands for.

    weight = make_weight("e3m2", 8192, 8192, torch.device("cuda"))
    kit.run(case, x, weight.stored)          # the kernel, on the packed planes + scales
    torch.matmul(x, weight.dense.t())        # cuBLAS, on the very same weight values

Dense weights are random fp16. FPx weights are random eXmY codes (every code equally likely, so
every exponent and both signs occur) with per-row fp16 scales around 1/sqrt(K), packed by
`tensorpress.compiler.formats.fpx_layout` (numpy; the kit carries the formats package) and decoded by
`fpx.decode`: `dense` is decode(codes, scales) in fp16, exactly what the kernel multiplies by.
Drawing codes instead of quantising float weights keeps this fast at 36864 x 9216 (seconds, where
the quantiser would take a minute) and changes nothing the benchmark measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class KernelWeight:
    """W [M, K] as a kernel of format `fmt` takes it (`stored`, torch tensors) and as fp16 (`dense`)."""

    fmt: str
    stored: list[Any]
    dense: Any
    stored_bytes: int


def make_weight(fmt: str, m: int, k: int, device, seed: int = 0) -> KernelWeight:
    import numpy as np
    import torch

    if fmt.startswith("dense"):
        g = torch.Generator().manual_seed(seed)
        w = (torch.randn(m, k, generator=g) / k**0.5).to(torch.float16).to(device)
        return KernelWeight(fmt, [w], w, m * k * 2)
    from tensorpress.compiler.formats import fpx_codes as fpx
    from tensorpress.compiler.formats import fpx_layout, get_weight_format

    spec = get_weight_format(fmt)
    bits = fpx.code_bits(spec.ebits, spec.mbits)
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, size=(m, k), dtype=np.uint8)
    # mean |value| of uniformly drawn codes is a sizeable fraction of max_value; aim W at ~1/sqrt(K)
    typical = float(np.abs(fpx.code_values(spec.ebits, spec.mbits)).mean())
    scales = (rng.uniform(0.5, 1.5, m) / (typical * k**0.5)).astype(np.float16)
    planes = fpx_layout.pack_fpx_planes(codes, spec.ebits, spec.mbits)
    dense = fpx.decode(codes, scales, spec.ebits, spec.mbits).astype(np.float16)
    arrays = [*planes.values(), scales]
    stored = [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays]
    return KernelWeight(fmt, stored, torch.from_numpy(dense).to(device), sum(int(a.nbytes) for a in arrays))
