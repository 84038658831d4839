"""Which schedule rules build which target, in the order they are tried.

A rule follows dlight's contract (`tvm.s_tir.dlight.ScheduleRule`): `apply(func, target, tunable)`
returns a Schedule, or None for "not mine". Ours and dlight's sit in one list; the first rule that
returns a schedule wins, and a fallback comes last.
"""

from __future__ import annotations

from tvm.s_tir import dlight as dl
from tvm.target import Target

from tensorpress.schedules.template_config import ConfigLookup


class NotMineOnError(dl.ScheduleRule):
    """A rule that answers "not mine" (None) where the wrapped rule raises, so the next rule is tried.

    dlight's rules raise on some PrimFuncs they claim (TVM 0.27: gpu.Matmul on int64 symbolic extents next
    to int32 indices, cpu.GEMV on non-unit write regions); the next rule in the list schedules those.
    """

    def __init__(self, rule: dl.ScheduleRule):
        self.rule = rule

    def apply(self, func, target, tunable):
        try:
            return self.rule.apply(func, target, tunable)
        except Exception:  # noqa: BLE001 - any failure of a third-party rule means "not mine"
            return None


def rules_for(target: Target, configs: ConfigLookup | None = None) -> list[dl.ScheduleRule]:
    """The rule list for `target` (a TVM Target of kind llvm or cuda); `configs` gives the template
    rules tuned configs by kernel (None: every kernel gets its default)."""
    from tensorpress.schedules.kv_attention import kv_attention_rules

    if target.kind.name == "cuda":
        from tensorpress.schedules.tensorcore import tensorcore_rules

        return [
            *kv_attention_rules(),
            *tensorcore_rules(configs),
            NotMineOnError(dl.gpu.Matmul()),
            NotMineOnError(dl.gpu.GEMV()),
            NotMineOnError(dl.gpu.Reduction()),
            NotMineOnError(dl.gpu.GeneralReduction()),
            dl.gpu.Fallback(),
        ]
    from tensorpress.schedules.cpu import cpu_rules

    ours_first = [*kv_attention_rules(), *cpu_rules(configs)]
    return [rule if type(rule).__module__.startswith("tensorpress.") else NotMineOnError(rule) for rule in ours_first]
