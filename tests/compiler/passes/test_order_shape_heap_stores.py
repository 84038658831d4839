"""OrderShapeHeapStores: a shape function's stores come out in slot order, after the slots they read;
anything else is left as it is."""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from tensorpress.compiler.passes.order_shape_heap_stores import order_shape_heap_stores


@T.prim_func(s_tir=True)
def shuffled(H: T.Buffer((T.int64(7),), "int64")):
    T.func_attr({"tirx.is_host_func": True})
    H[T.int64(5)] = T.int64(4) * H[T.int64(0)]
    H[T.int64(2)] = H[T.int64(6)] + T.int64(1)  # reads slot 6: must come after it
    H[T.int64(6)] = T.int64(8) * H[T.int64(1)]
    H[T.int64(3)] = T.int64(2) * H[T.int64(0)]


def slots(func) -> list[int]:
    return [int(store.indices[0]) for store in func.body.seq]


def test_stores_come_in_slot_order_after_the_slots_they_read():
    ordered = order_shape_heap_stores(tvm.IRModule({"shape_func": shuffled}))["shape_func"]
    assert slots(ordered) == [3, 5, 6, 2]
    assert slots(shuffled) == [5, 2, 6, 3]  # the input module is not changed


def test_other_functions_are_left_alone():
    assert slots(order_shape_heap_stores(tvm.IRModule({"main": shuffled}))["main"]) == [5, 2, 6, 3]
