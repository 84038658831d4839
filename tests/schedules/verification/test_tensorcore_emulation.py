"""The emulated intrinsics, compiled for the CPU on their own, against numpy.

The impls replay PTX semantics from lane addresses and fragment tables; here they are fed random tiles
and compared with what the descs promise (element (i, k) of the tile lands in register_of(i, k)) and
with numpy's matrix product.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from tensorpress.schedules.tensorcore import fragments as frag
from tensorpress.schedules.verification import tensorcore_emulation as emulation


def compile_impl(impl):
    return tvm.compile(tvm.IRModule({"main": impl}), target="llvm")["main"]


def to_fragment(tile: np.ndarray, register_of) -> np.ndarray:
    """[16, 16] tile -> [32, 8] fragment through the layout (what the descs say)."""
    out = np.zeros((32, 8), tile.dtype)
    for i in range(16):
        for k in range(16):
            out[register_of(i, k)] = tile[i, k]
    return out


def from_accumulator(acc: np.ndarray) -> np.ndarray:
    """[2, 32, 4] accumulator -> [16, 16] tile."""
    tile = np.zeros((16, 16), acc.dtype)
    for h in range(2):
        for lane in range(32):
            for reg in range(4):
                tile[frag.c_element(h, lane, reg)] = acc[h, lane, reg]
    return tile


@pytest.mark.parametrize(
    "lane_row, register_of", [(frag.a_lane_row, frag.a_register), (frag.b_lane_row, frag.b_register)]
)
def test_emulated_ldmatrix_fills_the_desc_layout(lane_row, register_of):
    # A contiguous 16×16 tile here; the template replay runs it on real shared tiles (row pitch 32..136).
    tile = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float16)
    impl = compile_impl(emulation.ldmatrix_emulated_impl(lane_row, "global"))
    warp = tvm.runtime.tensor(np.zeros((32, 8), np.float16))
    impl(warp, tvm.runtime.tensor(tile))
    np.testing.assert_array_equal(warp.numpy(), to_fragment(tile, register_of))


def test_emulated_ldmatrix_rejects_a_misaligned_row_address():
    def half_row_off(lane):  # each lane points 4 fp16 (8 bytes) into its row
        row, col = frag.a_lane_row(lane)
        return row, col + 4

    impl = compile_impl(emulation.ldmatrix_emulated_impl(half_row_off, "global"))
    tile = tvm.runtime.tensor(np.zeros((16, 16), np.float16))
    with pytest.raises(Exception, match="16-byte aligned"):
        impl(tvm.runtime.tensor(np.zeros((32, 8), np.float16)), tile)


def test_emulated_mma_multiplies_fragments_like_numpy():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((16, 16)).astype(np.float16)
    b = rng.standard_normal((16, 16)).astype(np.float16)  # [cols, k]: C = A · Bᵀ
    c0 = rng.standard_normal((16, 16)).astype(np.float32)
    acc = np.zeros((2, 32, 4), np.float32)
    for i in range(16):
        for j in range(16):
            acc[frag.c_register(i, j)] = c0[i, j]
    impl = compile_impl(emulation.mma_emulated_impl())
    args = [to_fragment(a, frag.a_register), to_fragment(b, frag.b_register), acc]
    tensors = [tvm.runtime.tensor(x) for x in args]
    impl(*tensors)
    expected = c0 + a.astype(np.float32) @ b.astype(np.float32).T
    np.testing.assert_allclose(from_accumulator(tensors[2].numpy()), expected, rtol=1e-5, atol=1e-4)


def test_emulated_fill_zeroes_every_register():
    impl = compile_impl(emulation.fill_emulated_impl())
    acc = tvm.runtime.tensor(np.full((2, 32, 4), np.nan, np.float32))
    impl(acc)
    assert not acc.numpy().any()


def test_emulated_fragment_writer_puts_the_low_half_first():
    # A pair written as 32 bits lands in slots 2p (bits 0..15) and 2p + 1 (bits 16..31) of the lane,
    # in the tile it names, as the GPU's register holds it.
    from tvm import tirx

    writer = emulation.EmulatedFragmentWriter()
    fragment = tirx.decl_buffer((2, 32, 8), "float16", name="fragment")
    bits = tirx.decl_buffer((2, 32, 4), "uint32", name="bits")
    lane = tirx.Var("lane", "int32")
    stores = [writer.store_pair(fragment, t, lane, p, bits[t, lane, p]) for t in range(2) for p in range(4)]
    body = writer.lane_loop(lane, tirx.SeqStmt(stores))
    func = tirx.PrimFunc([bits, fragment], body).with_attr("global_symbol", "main")
    values = np.random.default_rng(2).standard_normal((2, 32, 8)).astype(np.float16)
    words = values.view(np.uint32)  # little-endian: slot 2p is the low half of word p
    out = tvm.runtime.tensor(np.zeros((2, 32, 8), np.float16))
    compile_impl(func)(tvm.runtime.tensor(words), out)
    np.testing.assert_array_equal(out.numpy().view(np.uint16), values.view(np.uint16))
