"""CPU schedule of the weight GEMM (`schedules/weight_gemm.py`): Y[n, m] = X[n, k] . W[m, k] (+ bias).

Any decode stage works unchanged: its "decode" block runs once per column tile of M, into a [K, cols]
panel that the register-blocked micro-kernel (`register_blocked_gemm`) streams through for every row
tile of N, so the decode cost is paid once per weight element and call, not once per token.
A stage whose stored layout already is such a panel (its `cpu_panel_width`, e.g. dense column panels)
is read in place instead, and costs nothing to decode.

For few tokens (the PrimFunc's tensorpress.n_hint <= 16: decode steps) the decode is the work, and a
stage that reads its rows word by word (its `cpu_decode_order`, e.g. FPx) takes `decode_along_k` instead:
8 codes decoded per vector instruction, straight into 8-wide dot products, no panel.

A stage offering row slots (sparse formats such as ellpack) gets a GEMM over its nonzeros instead,
scheduled by `row_slot_gemm`.

Which of these and with which register tile is a `CpuGemmConfig` (`gemm_config.py`): the default one
above, or a tuned one from the build's `ConfigLookup` (`schedules/template_config.py`) when it is valid
for the kernel.
"""

from __future__ import annotations

import warnings

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from tensorpress.errors import ConfigError
from tensorpress.schedules.cpu.gemm_config import (
    CpuGemmConfig,
    check_config,
    default_config,
    panel_default,
    schedule_with_config,
)
from tensorpress.schedules.template_config import CPU_WEIGHT_GEMM, DEFAULT_ORIGIN, ConfigLookup, stamped
from tensorpress.schedules.weight_gemm import is_weight_gemm


class WeightGemm(CPUScheduleRule):
    """The weight-GEMM PrimFunc (attribute tensorpress.kernel = "weight_gemm") on an llvm target;
    `configs` gives tuned configs by kernel (None: the defaults everywhere)."""

    def __init__(self, configs: ConfigLookup | None = None):
        self.configs = configs

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        if not is_weight_gemm(func):
            return None
        # Tried in order: the tuned config, the default, the panel schedule (a decode TVM cannot walk
        # along K); None (the fallback rule takes it, slower but right) when none schedules.
        choices = [*self._tuned(func, target), (default_config(func, target), DEFAULT_ORIGIN)]
        if choices[-1][0].schedule == "along_k":
            choices.append((panel_default(target), DEFAULT_ORIGIN))
        for config, origin in choices:
            try:
                return schedule_with_config(stamped(func, CPU_WEIGHT_GEMM, config.to_dict(), origin), target, config)
            except s_tir.ScheduleError:
                continue
        return None

    def _tuned(self, func: tirx.PrimFunc, target: Target) -> list[tuple[CpuGemmConfig, str]]:
        """[(the tuned config, its log)] when the lookup has one that is valid for `func`, else []."""
        found = self.configs.tuned(func, CPU_WEIGHT_GEMM) if self.configs is not None else None
        if found is None:
            return []
        params, origin = found
        try:
            config = CpuGemmConfig.from_dict(params)
            check_config(config, func, target)
        except ConfigError as err:
            name = func.attrs.get("global_symbol", "a weight GEMM")
            warnings.warn(f"{origin}: tuned config for {name} not used ({err})", stacklevel=2)
            return []
        return [(config, origin)]
