"""vector_exp (schedules/cpu/vector_exp.py): a vectorised float32 kernel of it against numpy's float64
exp over the whole float32 input range, and no libm call left in the machine code."""

import numpy as np
import pytest
import tvm
from tvm import s_tir
from tvm.script import tirx as T

from tensorpress.compiler.targets import TargetSpec
from tensorpress.schedules.cpu.vector_exp import vector_exp, with_vector_exp

N = 1 << 20


@pytest.fixture(scope="module")
def exp_kernel():
    @T.prim_func(s_tir=True)
    def exp_all(x: T.Buffer((N,), "float32"), y: T.Buffer((N,), "float32")):
        T.func_attr({"global_symbol": "exp_all", "tirx.noalias": True})
        for i in range(N):
            with T.sblock("y"):
                vi = T.axis.spatial(N, i)
                y[vi] = T.exp(x[vi])

    sch = s_tir.Schedule(exp_all)
    _, lanes = sch.split(sch.get_loops(sch.get_sblock("y"))[0], [None, 8])
    sch.vectorize(lanes)
    target = TargetSpec("cpu").tvm_target()
    with target:
        lib = tvm.compile(tvm.IRModule({"exp_all": with_vector_exp(sch.mod["main"])}), target=target)

    def run(x: np.ndarray) -> np.ndarray:
        padded = np.zeros(N, np.float32)
        padded[: x.size] = x
        y = tvm.runtime.empty((N,), "float32")
        lib["exp_all"](tvm.runtime.tensor(padded), y)
        return y.numpy()[: x.size]

    return lib, run


def _ulp_error(got: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|got - e^x| in units of the float32 spacing at e^x (exact in float64)."""
    exact = np.exp(x.astype(np.float64))
    spacing = np.spacing(exact.astype(np.float32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / spacing


def test_within_two_ulp_over_the_normal_range(exp_kernel):
    _, run = exp_kernel
    x = np.linspace(-87.3, 88.72, N, dtype=np.float32)
    assert _ulp_error(run(x), x).max() <= 2.0


def test_within_two_ulp_near_zero_and_around_attention_scores(exp_kernel):
    _, run = exp_kernel
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            -np.abs(rng.standard_normal(N // 2) * 10),  # s - max of softmax: never above 0
            np.linspace(-1e-3, 1e-3, N // 4),
            [0.0, -0.0, 1e-30, -1e-30, np.log(2), -np.log(2), 1.0, -1.0],
        ]
    ).astype(np.float32)
    got = run(x)
    assert _ulp_error(got, x).max() <= 2.0
    assert got[np.flatnonzero(x == 0)].tolist() == [1.0, 1.0]


def test_edges_infinities_and_nan(exp_kernel):
    _, run = exp_kernel
    x = np.array([-np.inf, -1e30, -104.0, -103.0, -100.0, -90.0, 88.8, 89.0, 1e30, np.inf, np.nan], np.float32)
    got = run(x)
    expected = np.exp(x.astype(np.float64)).astype(np.float32)  # subnormals rounded once, as ours
    smallest = np.float32(2.0**-149)
    assert got[0] == 0 and got[1] == 0 and got[2] == 0
    assert np.all(np.abs(got[3:6] - expected[3:6]) <= smallest)  # subnormal results: within one step
    assert np.all(np.isposinf(got[6:10]))
    assert np.isnan(got[10])


def test_vectorised_without_a_libm_call(exp_kernel):
    lib, _ = exp_kernel
    asm = lib.mod.inspect_source("asm") if hasattr(lib, "mod") else lib.inspect_source("asm")
    assert "expf" not in asm
    assert "vfmadd" in asm or "vmulps" in asm  # 8-lane float arithmetic (ymm)
    assert "ymm" in asm


def test_rejects_other_dtypes():
    from tvm import tirx

    with pytest.raises(ValueError, match="float32 only"):
        vector_exp(tirx.Var("x", "float64"))
