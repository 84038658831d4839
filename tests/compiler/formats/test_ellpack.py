"""ellpack sparse weights (`compiler/formats/ellpack.py`): pack / unpack against the dense weight in
fp16 (hypothesis-fuzzed densities and shapes), the stored arrays read slot by slot as the docstring's
picture says, and the weight GEMM over the nonzeros built for llvm against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llvm_harness import build, run

from tensorpress.compiler.formats import get_weight_format, sparse_weight_format_names
from tensorpress.errors import TensorpressError
from tensorpress.schedules.cpu.row_slot_gemm import schedule_row_slot_gemm
from tensorpress.schedules.weight_gemm import N_HINT_ATTR, make_weight_gemm

FMT = get_weight_format("ellpack")


def sparse_weight(m: int, k: int, density: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, k)).astype(np.float32)
    w[rng.random((m, k)) >= density] = 0
    return w


def read_slots(arrays: dict[str, np.ndarray], m: int, k: int) -> np.ndarray:
    """W rebuilt slot by slot: row r's slot s is values/cols[r // 8, s, r % 8]; padding slots hold 0."""
    w = np.zeros((m, k), np.float32)
    values, cols = arrays["values"], arrays["cols"]
    for r in range(m):
        seen = []
        for s in range(values.shape[1]):
            v, c = float(values[r // 8, s, r % 8]), int(cols[r // 8, s, r % 8])
            if v != 0:
                assert c not in seen and (not seen or c > seen[-1])  # each column once, ascending
                seen.append(c)
                w[r, c] = v
            else:
                assert c == 0
    return w


def test_registered_as_a_cpu_sparse_format():
    assert "ellpack" in sparse_weight_format_names()
    assert FMT.sparse and FMT.targets == ("cpu",) and FMT.auto_targets == ("cpu",)
    assert FMT.unsupported_reason(37, 101) is None  # the CPU kernel takes any shape


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 40),
    k=st.integers(1, 150),
    density=st.sampled_from([0.0, 0.001, 0.1, 0.5, 0.9, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_is_the_weight_in_fp16(m, k, density, seed):
    w = sparse_weight(m, k, density, seed)
    packed = FMT.pack(w)
    want = w.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(FMT.unpack(packed), want)
    np.testing.assert_array_equal(read_slots(packed.arrays, m, k), want)
    counts = (want != 0).sum(axis=1)
    slots = max(int(counts.max()), 1)
    blocks = -(-m // 8)
    assert packed.arrays["values"].shape == (blocks, slots, 8) == packed.arrays["cols"].shape
    assert packed.arrays["values"].dtype == np.float16 and packed.arrays["cols"].dtype == np.uint16
    assert packed.nbytes == FMT.sparse_bytes(m, k, counts) == blocks * 8 * slots * 4


def test_wide_rows_take_int32_columns_and_fp16_zeros_are_not_stored():
    w = np.zeros((3, 70000), np.float32)
    w[0, 69999], w[1, 5], w[2, 7] = 1.5, 1e-9, -0.0  # 1e-9 underflows fp16: a zero
    packed = FMT.pack(w)
    assert packed.arrays["cols"].dtype == np.int32 and packed.arrays["values"].shape == (1, 1, 8)
    np.testing.assert_array_equal(FMT.unpack(packed), w.astype(np.float16).astype(np.float32))


def test_bad_weights_are_refused():
    with pytest.raises(TensorpressError, match="inf or NaN"):
        FMT.pack(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(TensorpressError, match="fp16's range"):
        FMT.pack(np.array([[1e6, 0.0]], np.float32))


def slot_gemm(packed, m, k, act_dtype, n_hint):
    stage = FMT.decode_stage()
    func = make_weight_gemm(stage, m, k, act_dtype, with_bias=True, buffers=packed.buffers)
    return build(schedule_row_slot_gemm(func.with_attr(N_HINT_ATTR, n_hint)).mod["main"])


@pytest.mark.parametrize("act_dtype", ["float32", "float16"])
@pytest.mark.parametrize(("m", "k", "density"), [(37, 101, 0.3), (64, 64, 0.05), (9, 33, 1.0)])
def test_weight_gemm_over_the_nonzeros_is_x_times_w(act_dtype, m, k, density):
    rng = np.random.default_rng(m * k)
    w = sparse_weight(m, k, density, seed=m)
    w[m // 2] = 0  # an empty row: all padding slots
    packed = FMT.pack(w)
    w_hat = FMT.unpack(packed).astype(np.float64)
    bias = rng.standard_normal(m).astype(act_dtype)
    for n_hint in (1, 16, 128):  # the three schedules: gather, 8 tokens in lanes, 16
        func = slot_gemm(packed, m, k, act_dtype, n_hint)
        for n in (1, 3, 16, 33):
            x = rng.standard_normal((n, k)).astype(act_dtype)
            y = run(func, [x, packed.arrays["values"], packed.arrays["cols"], bias], (n, m), act_dtype)
            want = x.astype(np.float64) @ w_hat.T + bias.astype(np.float64)
            tol = 1e-5 if act_dtype == "float32" else 2e-3
            np.testing.assert_allclose(y.astype(np.float64), want, rtol=tol, atol=tol * 4, err_msg=f"{n_hint=} {n=}")


def one_token_kernel(packed, m, k, with_bias):
    """The one-token (n_hint 1) weight GEMM over `packed`, scheduled by the CPU rule and built for the
    artifact CPU target (x86-64-v3), as the compile pipeline builds it: (kernel, its assembly)."""
    import tvm

    from tensorpress.compiler.targets import parse_target
    from tensorpress.schedules.cpu.weight_gemm import WeightGemm

    func = make_weight_gemm(FMT.decode_stage(), m, k, "float32", with_bias=with_bias, buffers=packed.buffers)
    target = parse_target("cpu").tvm_target()
    sch = WeightGemm().apply(func.with_attr(N_HINT_ATTR, 1), target, False)
    lib = tvm.compile(sch.mod, target=target)
    return lib["main"], lib.mod.inspect_source("asm") if hasattr(lib, "mod") else lib.inspect_source("asm")


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize(("m", "k", "with_bias"), [(45, 77, True), (16, 200, False)])
def test_one_token_gather_kernel_is_x_times_w(density, m, k, with_bias):
    """The written-out gather (`schedules/cpu/row_slot_gather.py`): rows not a multiple of 8, every
    density (0: one all-padding slot), 1 to 16 tokens, with and without bias, against numpy in float64."""
    rng = np.random.default_rng(int(density * 10) + m)
    packed = FMT.pack(sparse_weight(m, k, density, seed=k))
    w_hat = FMT.unpack(packed).astype(np.float64)
    bias = rng.standard_normal(m).astype(np.float32)
    kernel, _ = one_token_kernel(packed, m, k, with_bias)
    for n in (1, 3, 16):
        x = rng.standard_normal((n, k)).astype(np.float32)
        args = [x, packed.arrays["values"], packed.arrays["cols"], *([bias] if with_bias else [])]
        y = run(kernel, args, (n, m), "float32")
        want = x.astype(np.float64) @ w_hat.T + (bias.astype(np.float64) if with_bias else 0)
        np.testing.assert_allclose(y.astype(np.float64), want, rtol=1e-5, atol=4e-5, err_msg=f"{density=} {n=}")


def test_one_token_gather_addresses_x_with_scalar_column_loads():
    """The point of the written-out gather: X is addressed by columns loaded as scalars (movzwl), not
    extracted from a vector of columns (vpextrd/vpextrq, 2 uops each on Zen, 1.4x slower at 4096^2)."""
    packed = FMT.pack(sparse_weight(64, 512, 0.2, seed=3))
    _, asm = one_token_kernel(packed, 64, 512, with_bias=False)
    assert "vcvtph2ps" in asm and "vfmadd231ps" in asm
    assert "movzwl" in asm
    assert "vpextrd" not in asm and "vpextrq" not in asm
