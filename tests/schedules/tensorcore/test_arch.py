"""Architecture names the template accepts (sm_90a included, unlike dlight's parser)."""

from __future__ import annotations

import pytest
import tvm

from tensorpress.errors import ConfigError
from tensorpress.schedules.tensorcore.arch import arch_spec, target_arch


@pytest.mark.parametrize("text, name", [("sm_80", "sm_80"), ("sm_90a", "sm_90a"), ("90a", "sm_90a"), ("sm86", "sm_86")])
def test_arch_names(text, name):
    assert arch_spec(text).name == name


def test_hopper_limits():
    spec = arch_spec("sm_90a")
    assert (spec.major, spec.minor, spec.shared_bytes_per_block, spec.sm_count) == (9, 0, 232448, 132)


@pytest.mark.parametrize("text", ["sm_75", "sm_100", "gfx90a", ""])
def test_unsupported_arch_is_a_config_error(text):
    with pytest.raises(ConfigError, match="not supported by the Tensor Core template"):
        arch_spec(text)


def test_target_arch_reads_the_cuda_target():
    assert target_arch(tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})) == "sm_90a"
