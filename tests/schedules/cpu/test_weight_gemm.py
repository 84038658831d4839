"""The CPU weight-GEMM schedule against numpy: any decode stage, symbolic N, ragged sizes."""

import numpy as np
import pytest
from cpu_schedule_harness import AVX2, AVX512, compiled, host_has, rng, schedule
from tvm import te

from tensorpress.compiler.formats import decode_stage
from tensorpress.compiler.formats.dense_column_panels import pack_dense_panel
from tensorpress.schedules.cpu.weight_gemm import WeightGemm
from tensorpress.schedules.decode_stage import DecodeStage, StoredBuffer
from tensorpress.schedules.weight_gemm import make_weight_gemm


class ScaledInt8Decode(DecodeStage):
    """A decode with arithmetic, like the FPx stages: W[m, k] = codes[m, k] * scale[m]."""

    name = "test-scaled-int8"

    def stored_buffers(self, m, k):
        return [StoredBuffer("codes", (m, k), "int8"), StoredBuffer("scale", (m,), "float32")]

    def decode(self, stored, row, col, dtype):
        return stored[0][row, col].astype(dtype) * stored[1][row].astype(dtype)


def _reference(x, w, bias):
    y = x.astype(np.float64) @ w.astype(np.float64).T
    return y if bias is None else y + bias


def _check(fmt, m, k, ns, with_bias, target=AVX2, act="float32"):
    stage = decode_stage(fmt) if isinstance(fmt, str) else fmt
    call = compiled(schedule(WeightGemm(), make_weight_gemm(stage, m, k, act, act, with_bias), target), target)
    g = rng(m * 1000 + k)
    w = g.standard_normal((m, k)).astype(np.float32)
    if fmt == "dense-fp16":
        w = w.astype(np.float16).astype(np.float32)
    bias = g.standard_normal(m).astype(act) if with_bias else None
    if fmt == "dense-fp16":
        stored = [w.astype(np.float16)]
    elif fmt == "dense-fp32-panel":
        stored = [pack_dense_panel(w)]
    elif isinstance(fmt, ScaledInt8Decode):
        codes = g.integers(-127, 128, size=(m, k)).astype(np.int8)
        scale = g.uniform(0.01, 0.1, size=m).astype(np.float32)
        w = codes.astype(np.float32) * scale[:, None]
        stored = [codes, scale]
    else:
        stored = [w]
    for n in ns:
        x = g.standard_normal((n, k)).astype(act)
        inputs = [x, *stored] + ([bias] if with_bias else [])
        (y,) = call(inputs, [((n, m), act)])
        ref = _reference(x, w, None if bias is None else bias.astype(np.float64))
        tol = 2e-2 if act == "float16" else 1e-4
        np.testing.assert_allclose(y.astype(np.float64), ref, rtol=tol, atol=tol, err_msg=f"N={n}")


@pytest.mark.parametrize("m, k", [(48, 40), (40, 24), (20, 30)])
def test_dense_fp32_any_n(m, k):
    # 48: two-vector tiles; 40: one-vector tiles (40 % 16 != 0); 20: padded columns; K ragged.
    _check("dense-fp32", m, k, ns=(1, 3, 33), with_bias=True)


def test_dense_fp32_without_bias():
    _check("dense-fp32", 32, 16, ns=(6, 7), with_bias=False)


def test_panel_weights_are_read_in_place():
    _check("dense-fp32-panel", 32, 24, ns=(1, 3, 33), with_bias=True)


@pytest.mark.parametrize("m", [20, 40, 1000])
def test_panel_weights_with_a_padded_last_panel(m):
    # a classifier's 1000 classes, a 24-channel conv: M not a multiple of the 16-wide panel
    _check("dense-fp32-panel", m, 40, ns=(1, 7), with_bias=True)


def test_fp16_weights_with_fp32_activations():
    _check("dense-fp16", 32, 32, ns=(5,), with_bias=True)


def test_fp16_activations_accumulate_in_fp32():
    _check("dense-fp16", 32, 48, ns=(9,), with_bias=True, act="float16")


def test_a_decode_with_arithmetic_runs_once_per_column_tile():
    _check(ScaledInt8Decode(), 48, 64, ns=(2, 13), with_bias=True)


@pytest.mark.skipif(not host_has("avx512f"), reason="this CPU cannot run AVX-512 code")
def test_avx512_tiles():
    _check("dense-fp32", 64, 40, ns=(1, 9, 33), with_bias=True, target=AVX512)
    _check("dense-fp32-panel", 48, 24, ns=(3,), with_bias=False, target=AVX512)


def test_declines_other_functions_and_targets():
    x = te.placeholder((8, 8), "float32", name="x")
    y = te.compute((8, 8), lambda i, j: x[i, j] * 2.0, name="y")
    assert WeightGemm().apply(te.create_prim_func([x, y]), AVX2, False) is None
    gemm = make_weight_gemm(decode_stage("dense-fp32"), 16, 16, "float32", "float32", False)
    import tvm

    assert WeightGemm().apply(gemm, tvm.target.Target({"kind": "cuda", "arch": "sm_80"}), False) is None


def _fpx_check(fmt, m, k, ns, n_hint, with_bias, act="float32"):
    """FPx through the CPU rule against numpy with the exact decoded weights; returns the schedule."""
    from tensorpress.compiler.formats import get_weight_format
    from tensorpress.schedules.weight_gemm import N_HINT_ATTR

    func = make_weight_gemm(decode_stage(fmt), m, k, act, act, with_bias)
    if n_hint is not None:
        func = func.with_attr(N_HINT_ATTR, n_hint)
    sch = schedule(WeightGemm(), func)
    call = compiled(sch)
    g = rng(m + k + (n_hint or 0))
    packed = get_weight_format(fmt).pack(g.standard_normal((m, k)).astype(np.float32))
    w = get_weight_format(fmt).unpack(packed)
    bias = g.standard_normal(m).astype(act) if with_bias else None
    for n in ns:
        x = g.standard_normal((n, k)).astype(act)
        (y,) = call([x, *packed.arrays.values(), *([bias] if with_bias else [])], [((n, m), act)])
        ref = _reference(x, w, None if bias is None else bias.astype(np.float64))
        tol = 2e-2 if act == "float16" else 1e-4
        np.testing.assert_allclose(y.astype(np.float64), ref, rtol=tol, atol=tol, err_msg=f"{fmt} N={n}")
    return sch


def _decodes_along_k(sch) -> bool:
    names = set()
    import tvm_ffi
    from tvm.s_tir.stmt import SBlock

    tvm_ffi.structural_map(sch.mod["main"].body, (SBlock, lambda b: names.add(str(b.name_hint)) or b))
    return "gemm_rf_update" in names  # the 8 partial sums per output of the decode-along-K kernel


@pytest.mark.parametrize("fmt", ["fp6", "fp6_e2m3", "fp5", "e3m1", "fp4", "int8"])
@pytest.mark.parametrize("n_hint", [1, 16])
def test_fpx_few_tokens_decode_along_k(fmt, n_hint):
    # decode steps: 8 codes a vector instruction, straight into the dot products; any N still works
    sch = _fpx_check(fmt, 48, 96, ns=(1, 3, 6), n_hint=n_hint, with_bias=fmt == "fp6")
    assert _decodes_along_k(sch)


def test_fpx_fp16_activations_decode_along_k():
    assert _decodes_along_k(_fpx_check("fp6", 32, 64, ns=(2, 5), n_hint=4, with_bias=True, act="float16"))


@pytest.mark.parametrize("m, k, n_hint", [(48, 96, 128), (48, 80, 4)])
def test_fpx_takes_the_panel_schedule_otherwise(m, k, n_hint):
    # many tokens (decode once per panel, reuse it across them), or K not whole groups of 32
    sch = _fpx_check("fp6", m, k, ns=(1, 7), n_hint=n_hint, with_bias=True)
    assert not _decodes_along_k(sch)
