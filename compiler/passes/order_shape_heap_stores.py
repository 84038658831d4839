"""OrderShapeHeapStores: the VM's shape functions store their slots in one fixed order, so two compiles
of the same model give the same library bytes.

Relax's VMShapeLower writes, for each function, a host `shape_func` that fills the VM's shape heap H:

    H[6] = 4 * H[0] * 1024;   H[4] = 256 * H[0];   H[5] = 1536 * H[0];   H[3] = 512 * H[0]

TVM 0.27 emits those stores in the order of a hash map keyed by pointers, which changes from process to
process: the same model compiled twice gave two libraries. The stores are independent except where one
reads a slot another writes, so this pass sorts them by the slot they write, keeping every store after
the stores of the slots it reads. It runs right after VMShapeLower, inside the build's lowering.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx


def order_shape_heap_stores(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with the body of every shape function that is a run of constant-slot stores put in order."""
    updates = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and gvar.name_hint.startswith("shape_func"):
            body = _ordered(func.body)
            if body is not None:
                updates[gvar] = func.with_body(body)
    if not updates:
        return mod
    mod = mod.clone()
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod


def _ordered(body) -> tirx.SeqStmt | None:
    """The stores of `body` in order (slot written, after the slots each reads), or None to leave it."""
    if not isinstance(body, tirx.SeqStmt):
        return None
    stores: dict[int, tirx.BufferStore] = {}
    for stmt in body.seq:
        slot = _slot(stmt)
        if slot is None:
            return None  # not a plain run of heap stores
        stores[slot] = stmt
    if len(stores) != len(body.seq):
        return None  # a slot written twice: the order matters as it is
    reads = {slot: _slots_read(store.value) & set(stores) - {slot} for slot, store in stores.items()}
    done: list[int] = []
    while len(done) < len(stores):
        ready = [slot for slot in stores if slot not in done and reads[slot] <= set(done)]
        if not ready:
            return None  # a cycle cannot come from VMShapeLower; leave such a body alone
        done.append(min(ready))
    return tirx.SeqStmt([stores[slot] for slot in done])


def _slot(stmt) -> int | None:
    """The heap slot a `H[c] = ...` store writes (a constant index), else None."""
    if isinstance(stmt, tirx.BufferStore) and len(stmt.indices) == 1 and isinstance(stmt.indices[0], tirx.IntImm):
        return int(stmt.indices[0])
    return None


def _slots_read(expr) -> set[int]:
    found: set[int] = set()

    def visit(load):
        if len(load.indices) == 1 and isinstance(load.indices[0], tirx.IntImm):
            found.add(int(load.indices[0]))
        return load

    tvm_ffi.structural_map(expr, (tvm.ir.TensorLoad, visit))  # TVM 0.27: tirx.BufferLoad is a factory
    return found
