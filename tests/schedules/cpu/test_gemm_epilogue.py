"""The weight GEMM's epilogue (`schedules/gemm_epilogue.py`) on the CPU: GELU and a residual add computed in
the store stage, for every kind of CPU schedule (panel, decode along K, row slots, the one-token gather),
against torch in float64."""

import numpy as np
import pytest
import torch
from cpu_schedule_harness import AVX2, compiled, rng

from tensorpress.compiler.formats import get_weight_format
from tensorpress.schedules.cpu.weight_gemm import WeightGemm
from tensorpress.schedules.gemm_epilogue import GemmEpilogue, epilogue_of
from tensorpress.schedules.template_config import kernel_signature
from tensorpress.schedules.weight_gemm import N_HINT_ATTR, make_weight_gemm

EPILOGUES = [GemmEpilogue(activation="gelu"), GemmEpilogue(residual=True), GemmEpilogue("gelu", residual=True)]


def _reference(x, w, bias, epilogue: GemmEpilogue, residual):
    y = torch.from_numpy(x.astype(np.float64) @ w.astype(np.float64).T + bias.astype(np.float64))
    if epilogue.activation == "gelu":
        y = torch.nn.functional.gelu(y)  # exact erf: the fast polynomial is within 1e-6 of it
    return (y.numpy() + residual.astype(np.float64)) if epilogue.residual else y.numpy()


def _check(fmt: str, m: int, k: int, n_hint: int, epilogue: GemmEpilogue, ns=(1, 5, 33)):
    weight_format = get_weight_format(fmt)
    g = rng(m + k + n_hint)
    w = g.standard_normal((m, k)).astype(np.float32)
    if weight_format.sparse:
        w[g.random((m, k)) < 0.7] = 0
    packed = weight_format.pack(w)
    w_stored = weight_format.unpack(packed)
    func = make_weight_gemm(
        weight_format.decode_stage(), m, k, "float32", with_bias=True, buffers=packed.buffers, epilogue=epilogue
    ).with_attr(N_HINT_ATTR, n_hint)
    assert epilogue_of(func) == epilogue
    sch = WeightGemm().apply(func, AVX2, False)
    assert sch is not None
    call = compiled(sch, AVX2)
    bias = g.standard_normal(m).astype(np.float32)
    for n in ns:
        x = g.standard_normal((n, k)).astype(np.float32)
        residual = g.standard_normal((n, m)).astype(np.float32)
        inputs = [x, *packed.arrays.values(), bias, *([residual] if epilogue.residual else [])]
        (y,) = call(inputs, [((n, m), "float32")])
        want = _reference(x, w_stored, bias, epilogue, residual)
        np.testing.assert_allclose(y.astype(np.float64), want, rtol=1e-4, atol=1e-4, err_msg=f"{fmt} {n_hint=} {n=}")


@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: e.name_suffix())
@pytest.mark.parametrize(
    "fmt, m, k, n_hint",
    [
        ("dense-fp32-panel", 40, 24, 128),  # panel read in place, a padded last panel
        ("dense-fp32", 48, 40, 128),  # panel packed from [M, K]
        ("fp6", 48, 96, 128),  # FPx decoded into panels, row scale after the sum
        ("fp6", 48, 96, 4),  # FPx decoded along K (decode steps)
        ("ellpack", 37, 50, 128),  # row slots, tokens in the vector lanes
        ("ellpack", 37, 50, 1),  # row slots, the written-out one-token gather
    ],
)
def test_epilogue_is_computed_in_the_store(fmt, m, k, n_hint, epilogue):
    _check(fmt, m, k, n_hint, epilogue)


def test_the_residual_is_an_argument_before_y_and_leaves_the_tuning_key_alone():
    stage = get_weight_format("dense-fp32-panel").decode_stage()
    plain = make_weight_gemm(stage, 32, 16, "float32", with_bias=True)
    fused = make_weight_gemm(stage, 32, 16, "float32", with_bias=True, epilogue=GemmEpilogue("gelu", True))
    names = [buffer.name for buffer in fused.params]
    assert names[-3:-1] == ["bias", "residual"]
    assert epilogue_of(plain) == GemmEpilogue()
    # a tuned tile config is the same kernel's whatever its epilogue (as with the bias)
    assert kernel_signature(plain) == kernel_signature(fused)


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="unknown epilogue activation"):
        GemmEpilogue(activation="swish")
