"""The schedule rule that puts weight-GEMM PrimFuncs for CUDA onto the Tensor Core template.

It follows dlight's contract (`apply(func, target, tunable) -> Schedule | None`) and sits before
dlight's rules in `schedules/rules.py`. It returns None (the next rule takes the function) for
anything that is not a weight GEMM, for GPUs older than sm_80, for activations other than float16,
and for shapes the template cannot take (M or K not a multiple of 16, or the format refuses them).
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import Schedule
from tvm.s_tir.dlight import ScheduleRule
from tvm.target import Target

from tensorpress.errors import ConfigError, ShapeError
from tensorpress.schedules.tensorcore.arch import arch_spec, target_arch
from tensorpress.schedules.tensorcore.intrinsics import cuda_intrinsics
from tensorpress.schedules.tensorcore.template import schedule_weight_gemm, weight_gemm_shape
from tensorpress.schedules.tensorcore.tile_config import TileConfig, choose_config
from tensorpress.schedules.weight_gemm import N_HINT_ATTR, is_weight_gemm


class WeightGemmTensorCore(ScheduleRule):
    """Weight GEMM (any decode stage) -> cp.async + ldmatrix + mma.sync kernel on sm_80+."""

    def config_for(self, func: tirx.PrimFunc, target: Target) -> TileConfig | None:
        """The tile config this rule would use, or None when the rule does not take `func`."""
        if not isinstance(func, tirx.PrimFunc) or not is_weight_gemm(func) or target.kind.name != "cuda":
            return None
        try:
            arch = arch_spec(target_arch(target) or "")
        except ConfigError:
            return None
        if str(func.params[0].dtype) != "float16":
            return None
        m, k = weight_gemm_shape(func)
        n_hint = int(func.attrs[N_HINT_ATTR]) if N_HINT_ATTR in func.attrs else 16
        try:
            return choose_config(m, k, arch, n_hint)
        except ShapeError:
            return None

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> Schedule | None:
        config = self.config_for(func, target)
        if config is None:
            return None
        try:
            return schedule_weight_gemm(func, config, cuda_intrinsics())
        except (ShapeError, ConfigError):
            return None
