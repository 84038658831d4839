"""Which schedule rules build which target, in the order they are tried.

A rule follows dlight's contract (`tvm.s_tir.dlight.ScheduleRule`): `apply(func, target, tunable)`
returns a Schedule, or None for "not mine". Ours and dlight's sit in one list; the first rule that
returns a schedule wins, and a fallback comes last.
"""

from __future__ import annotations

from tvm.s_tir import dlight as dl
from tvm.target import Target


def rules_for(target: Target) -> list[dl.ScheduleRule]:
    """The rule list for `target` (a TVM Target of kind llvm or cuda)."""
    if target.kind.name == "cuda":
        from tensorpress.schedules.tensorcore import tensorcore_rules

        return [
            *tensorcore_rules(),
            dl.gpu.Matmul(),
            dl.gpu.GEMV(),
            dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(),
            dl.gpu.Fallback(),
        ]
    from tensorpress.schedules.cpu import cpu_rules

    return cpu_rules()
