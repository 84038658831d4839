"""Which schedule rules build which target, in the order they are tried.

A rule follows dlight's contract (`tvm.s_tir.dlight.ScheduleRule`): `apply(func, target, tunable)`
returns a Schedule, or None for "not mine". Ours and dlight's sit in one list; the first rule that
returns a schedule wins, and a fallback comes last.
"""

from __future__ import annotations

from tvm.s_tir import dlight as dl
from tvm.target import Target


class NotMineOnError(dl.ScheduleRule):
    """A rule that answers "not mine" (None) where the wrapped rule raises, so the next rule is tried.

    dlight's CUDA matmul rule raises on some PrimFuncs it claims (int64 symbolic extents next to int32
    indices, TVM 0.27); the weight-GEMM fallback and dlight's Fallback schedule those instead.
    """

    def __init__(self, rule: dl.ScheduleRule):
        self.rule = rule

    def apply(self, func, target, tunable):
        try:
            return self.rule.apply(func, target, tunable)
        except Exception:  # noqa: BLE001 - any failure of a third-party rule means "not mine"
            return None


def rules_for(target: Target) -> list[dl.ScheduleRule]:
    """The rule list for `target` (a TVM Target of kind llvm or cuda)."""
    if target.kind.name == "cuda":
        from tensorpress.schedules.tensorcore import tensorcore_rules

        return [
            *tensorcore_rules(),
            NotMineOnError(dl.gpu.Matmul()),
            NotMineOnError(dl.gpu.GEMV()),
            NotMineOnError(dl.gpu.Reduction()),
            NotMineOnError(dl.gpu.GeneralReduction()),
            dl.gpu.Fallback(),
        ]
    from tensorpress.schedules.cpu import cpu_rules

    return cpu_rules()
