"""Tensor Core (sm_80 / sm_90a) schedules: the weight-GEMM template and its checking machinery."""

from __future__ import annotations

from tvm.s_tir import dlight as dl


def tensorcore_rules() -> list[dl.ScheduleRule]:
    """Rules for CUDA targets that come before dlight's."""
    return []
