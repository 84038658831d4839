"""The schedule rule that puts weight-GEMM PrimFuncs for CUDA onto the Tensor Core template.

It follows dlight's contract (`apply(func, target, tunable) -> Schedule | None`) and sits before
dlight's rules in `schedules/rules.py`. It returns None (the next rule takes the function) for
anything that is not a weight GEMM, for GPUs older than sm_80, for activations other than float16,
and for shapes the template cannot take (M or K not a multiple of 16, or the format refuses them).

The tile config is a tuned one from the build's `ConfigLookup` (`schedules/template_config.py`) when
it validates for the architecture and the shape, else `choose_config`'s.
"""

from __future__ import annotations

import warnings

from tvm import tirx
from tvm.s_tir import Schedule
from tvm.s_tir.dlight import ScheduleRule
from tvm.target import Target

from tensorpress.errors import ConfigError, ShapeError
from tensorpress.schedules.template_config import DEFAULT_ORIGIN, TENSORCORE_WEIGHT_GEMM, ConfigLookup, stamped
from tensorpress.schedules.tensorcore.arch import arch_spec, target_arch
from tensorpress.schedules.tensorcore.intrinsics import cuda_intrinsics
from tensorpress.schedules.tensorcore.template import schedule_weight_gemm, weight_gemm_shape
from tensorpress.schedules.tensorcore.tile_config import TileConfig, choose_config
from tensorpress.schedules.weight_gemm import N_HINT_ATTR, is_weight_gemm


class WeightGemmTensorCore(ScheduleRule):
    """Weight GEMM (any decode stage) -> cp.async + ldmatrix + mma.sync kernel on sm_80+; `configs`
    gives tuned tile configs by kernel (None: `choose_config` everywhere)."""

    def __init__(self, configs: ConfigLookup | None = None):
        self.configs = configs

    def config_for(self, func: tirx.PrimFunc, target: Target) -> TileConfig | None:
        """The tile config this rule would use, or None when the rule does not take `func`."""
        chosen = self.chosen_config(func, target)
        return None if chosen is None else chosen[0]

    def chosen_config(self, func: tirx.PrimFunc, target: Target) -> tuple[TileConfig, str] | None:
        """(the tile config this rule would use, where it came from: "default" or a tuning log), or None
        when the rule does not take `func`."""
        if not isinstance(func, tirx.PrimFunc) or not is_weight_gemm(func) or target.kind.name != "cuda":
            return None
        try:
            arch = arch_spec(target_arch(target) or "")
        except ConfigError:
            return None
        if str(func.params[0].dtype) != "float16":
            return None
        m, k = weight_gemm_shape(func)
        found = self.configs.tuned(func, TENSORCORE_WEIGHT_GEMM) if self.configs is not None else None
        if found is not None:
            params, origin = found
            try:
                tuned = TileConfig(**params) if isinstance(params, dict) else None
                if tuned is None:
                    raise ConfigError(f"tile config {params!r} is not a mapping of its parameters.")
                tuned.validate(arch)
                tuned.check_shape(m, k)
                return tuned, origin
            except (TypeError, ConfigError, ShapeError) as err:
                warnings.warn(f"{origin}: tuned tile config not used ({err})", stacklevel=2)
        n_hint = int(func.attrs[N_HINT_ATTR]) if N_HINT_ATTR in func.attrs else 16
        try:
            return choose_config(m, k, arch, n_hint), DEFAULT_ORIGIN
        except ShapeError:
            return None

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> Schedule | None:
        chosen = self.chosen_config(func, target)
        if chosen is None:
            return None
        config, origin = chosen
        try:
            return schedule_weight_gemm(
                stamped(func, TENSORCORE_WEIGHT_GEMM, config.to_dict(), origin), config, cuda_intrinsics()
            )
        except (ShapeError, ConfigError):
            return None
