"""The local measurer times a real kernel and turns a candidate that cannot run into math.inf."""

import math

import numpy as np
import pytest

from tensorpress.compiler.tuning.measure import ArgSpec, BuiltCandidate, LocalMeasurer, TimingPlan, random_arguments


def _add_one_library(tmp_path, n: int):
    import tvm
    from tvm.script import tirx as T

    @T.prim_func
    def add_one(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32")):
        for i in range(n):
            b[i] = a[i] + T.float32(1)

    path = tmp_path / "add_one.so"
    tvm.compile(tvm.IRModule({"add_one": add_one}), target="llvm").export_library(str(path))
    return path


def test_times_a_kernel_and_fails_softly(tmp_path):
    library = _add_one_library(tmp_path, 4096)
    args = (ArgSpec((4096,), "float32"), ArgSpec((4096,), "float32"))
    measurer = LocalMeasurer(TimingPlan(repeat=2, min_repeat_ms=1))
    good, missing_entry, missing_file = measurer.measure(
        [
            BuiltCandidate(library, "add_one", args),
            BuiltCandidate(library, "no_such_function", args),
            BuiltCandidate(tmp_path / "absent.so", "add_one", args),
        ]
    )
    assert 0 < good < 0.01
    assert missing_entry == math.inf and missing_file == math.inf


@pytest.mark.parametrize("dtype", ["float16", "float32", "uint8", "int32", "uint32"])
def test_random_arguments_are_finite_and_span_the_type(dtype):
    (array,) = random_arguments([ArgSpec((64, 64), dtype)])
    assert array.shape == (64, 64) and array.dtype == np.dtype(dtype)
    if array.dtype.kind == "f":
        assert np.isfinite(array).all() and np.abs(array).max() <= 1
    else:
        assert array.min() < 0 or np.iinfo(array.dtype).min == 0
        assert int(array.max()) > np.iinfo(array.dtype).max // 2
