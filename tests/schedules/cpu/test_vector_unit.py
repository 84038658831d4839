"""The vector unit comes from the target's features, not from the build machine."""

import pytest
import tvm

from tensorpress.schedules.cpu.register_blocked_gemm import register_tile
from tensorpress.schedules.cpu.vector_unit import VectorUnit, vector_unit


@pytest.mark.parametrize(
    "target, expected",
    [
        ({"kind": "llvm", "mcpu": "x86-64-v3"}, VectorUnit(256, 16)),
        ({"kind": "llvm", "mcpu": "core-avx2"}, VectorUnit(256, 16)),
        ({"kind": "llvm", "mcpu": "skylake-avx512"}, VectorUnit(512, 32)),
        ({"kind": "llvm", "mcpu": "x86-64"}, VectorUnit(128, 16)),
        ({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}, VectorUnit(128, 32)),
    ],
)
def test_vector_unit_of_target(target, expected):
    assert vector_unit(tvm.target.Target(target)) == expected


def test_lanes_per_dtype():
    avx2 = VectorUnit(256, 16)
    assert (avx2.lanes("float32"), avx2.lanes("float16"), avx2.lanes("int8"), avx2.lanes("bool")) == (8, 16, 32, 32)


def test_register_tile_fits_the_register_file():
    for unit in (VectorUnit(256, 16), VectorUnit(512, 32), VectorUnit(128, 32)):
        tile = register_tile(unit)
        vectors_per_row = tile.cols // unit.lanes("float32")
        # accumulators + one B vector per column vector + one broadcast A value
        assert tile.rows * vectors_per_row + vectors_per_row + 1 <= unit.registers
    assert (register_tile(VectorUnit(256, 16)).rows, register_tile(VectorUnit(256, 16)).cols) == (6, 16)
