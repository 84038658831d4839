"""Tensor Core (sm_80 / sm_90a) schedules: the weight-GEMM template and what it is built from.

template.py         schedule_weight_gemm(func, TileConfig, IntrinsicSet): the one GEMM schedule
tile_config.py      TileConfig (typed parameters), search space, shipped tiles, untuned choice
arch.py             per-architecture limits the parameters respect
rule.py             WeightGemmTensorCore: the dlight-style rule `compile --target cuda` uses
intrinsics.py       our ldmatrix / mma.sync / fill / store tensor intrinsics (PTX)
fragments.py        the register layouts of the m16n8k16 fragments (the PTX tables, once)
fragment_decode.py  decoding a format's staged words straight into the mma B registers

How these kernels are checked without a GPU (emulated intrinsics, CPU replay, SASS inspection) is
`schedules/verification/`.
"""

from __future__ import annotations

from tvm.s_tir import dlight as dl

from tensorpress.schedules.template_config import ConfigLookup


def tensorcore_rules(configs: ConfigLookup | None = None) -> list[dl.ScheduleRule]:
    """Rules for CUDA targets that come before dlight's; `configs`: tuned tile configs (None: defaults)."""
    from tensorpress.schedules.tensorcore.rule import WeightGemmTensorCore

    return [WeightGemmTensorCore(configs)]
