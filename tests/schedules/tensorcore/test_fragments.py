"""The fragment layouts against the PTX tables, written here a second time, independently.

The PTX ISA gives, per lane and register, which matrix element a fragment register holds and which
row address each ldmatrix lane supplies. These tests rebuild those tables from the ISA's wording and
check that the layouts the descs use (a_register, b_register, c_register) are exactly where the
hardware puts each element, for every element.
"""

from __future__ import annotations

import itertools

import pytest

from tensorpress.schedules.tensorcore import fragments as frag

LANES = range(32)


def isa_a_table():
    """m16n8k16 .f16 A (ISA figure 'MMA .m16n8k16 fragment layout for matrix A'): a0..a7 of lane l."""
    table = {}
    for lane, reg in itertools.product(LANES, range(8)):
        g, t = divmod(lane, 4)
        row = g if reg in (0, 1, 4, 5) else g + 8
        col = t * 2 + (reg & 1) + (8 if reg >= 4 else 0)
        table[(lane, reg)] = (row, col)
    return table


def isa_b_table():
    """m16n8k16 .f16 B (K×N, .col): b0..b3 of lane l hold B[k, n]."""
    table = {}
    for lane, reg in itertools.product(LANES, range(4)):
        g, t = divmod(lane, 4)
        k = t * 2 + (reg & 1) + (8 if reg >= 2 else 0)
        table[(lane, reg)] = (k, g)
    return table


def isa_c_table():
    """m16n8k16 .f32 C/D: c0..c3 of lane l."""
    table = {}
    for lane, reg in itertools.product(LANES, range(4)):
        g, t = divmod(lane, 4)
        table[(lane, reg)] = (g + (8 if reg >= 2 else 0), t * 2 + (reg & 1))
    return table


def test_ptx_forward_maps_match_the_isa_tables():
    assert {key: frag.ptx_a_element(*key) for key in isa_a_table()} == isa_a_table()
    assert {key: frag.ptx_b_element(*key) for key in isa_b_table()} == isa_b_table()
    assert {key: frag.ptx_c_element(*key) for key in isa_c_table()} == isa_c_table()


def test_a_register_is_where_mma_reads_each_a_element():
    for (lane, reg), (row, k) in isa_a_table().items():
        assert frag.a_register(row, k) == (lane, reg)


def test_b_register_is_where_each_mma_half_reads_b():
    # mma #h multiplies by cols 8h..8h+7 of the 16-col B tile, from slots 4h..4h+3.
    for half in (0, 1):
        for (lane, reg), (k, n) in isa_b_table().items():
            assert frag.b_register(n + 8 * half, k) == (lane, 4 * half + reg)


def test_c_register_is_where_each_mma_half_writes():
    for half in (0, 1):
        for (lane, reg), (row, col) in isa_c_table().items():
            assert frag.c_register(row, col + 8 * half) == (half, lane, reg)
            assert frag.c_element(half, lane, reg) == (row, col + 8 * half)


@pytest.mark.parametrize(
    "lane_row, register_of", [(frag.a_lane_row, frag.a_register), (frag.b_lane_row, frag.b_register)]
)
def test_ldmatrix_x4_with_our_lane_addresses_fills_the_fragment_layout(lane_row, register_of):
    # ISA: lane L supplies the address of row L % 8 of matrix L // 8; each lane t receives 2 elements
    # of row t // 4 (cols 2(t % 4), +1) of matrix j into its register j.
    seen = {}
    for t, j, e in itertools.product(LANES, range(4), range(2)):
        row, col0 = lane_row(8 * j + t // 4)
        seen[(t, 2 * j + e)] = (row, col0 + 2 * (t % 4) + e)
    assert len(set(seen.values())) == 256  # every element of the 16×16 tile exactly once
    for (lane, slot), element in seen.items():
        assert register_of(*element) == (lane, slot)


def test_b_layout_differs_from_tvm_stock_desc_labels():
    # TVM's stock desc labels the B fragment with the A/C map (4(k//8)+2(n//8)+k%2); the hardware puts
    # B[n, k] in slot 4(n//8)+2(k//8)+k%2. The prototype found this; our descs use the hardware's.
    def stock_label(n, k):
        return 4 * (n % 8) + (k % 8) // 2, 4 * (k // 8) + 2 * (n // 8) + k % 2

    differ = sum(stock_label(n, k) != frag.b_register(n, k) for n in range(16) for k in range(16))
    assert differ == 128


def test_layout_index_maps_tile_the_last_two_dims():
    assert frag.a_warp_layout(3, 37, 21) == (3, 2, 1, *frag.a_register(5, 5))
    assert frag.b_warp_layout(17, 40) == (1, 2, *frag.b_register(1, 8))
    assert frag.c_warp_layout(2, 18, 33) == (2, 1, 2, *frag.c_register(2, 1))


def test_b_register_pairs_are_the_32_bit_registers_of_the_isa():
    # Register pair p of a lane is one .b32 register of an mma: b0b1 or b2b3 (the ISA's k and k + 1
    # in its low and high half) of the cols 0-7 (p < 2) or cols 8-15 mma. It starts at an even k, and
    # the 4 pairs x 32 lanes cover the 16x16 tile's 128 pairs once.
    isa = isa_b_table()
    covered = set()
    for lane, pair in itertools.product(LANES, range(4)):
        col, k = frag.b_pair_element(lane, pair)
        low = isa[(lane, 2 * (pair % 2))]
        high = isa[(lane, 2 * (pair % 2) + 1)]
        assert (low, high) == ((k, col % 8), (k + 1, col % 8)) and col // 8 == pair // 2
        assert frag.b_register(col, k) == (lane, 2 * pair)
        assert frag.b_register(col, k + 1) == (lane, 2 * pair + 1)
        covered.add((col, k))
    assert covered == {(c, k) for c in range(16) for k in range(0, 16, 2)}
