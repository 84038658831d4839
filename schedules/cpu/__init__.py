"""CPU (llvm) schedules: tiling, vectorisation and threads for the ops of a transformer."""

from __future__ import annotations

from tvm.s_tir import dlight as dl


def cpu_rules() -> list[dl.ScheduleRule]:
    """Rules for llvm targets, most specific first."""
    return [dl.cpu.GEMV(), dl.cpu.Reduction()]
