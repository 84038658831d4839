"""The SASS steady-state count and the H100 issue budget, on a hand-written listing."""

from __future__ import annotations

import pytest

from tensorpress.schedules.tensorcore.tile_config import TileConfig
from tensorpress.schedules.verification.sass_cost import (
    ScatterTrips,
    parse_listing,
    scatter_steady_state,
    steady_state,
    summarize,
    weight_budget,
)

# A main loop (0x0010..0x0090, closed by the branch at 0x0090) holding an inner decode loop
# (0x0030..0x0050: 2 STS a trip) and two HMMA; code before and after it must not count.
LISTING = """
\tFunction : k_kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0020*/              @!P0 LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0030*/                   LOP3.LUT R5, R6, 0xf, RZ, 0xc0, !PT ;
        /*0040*/                   STS.U16 [R7], R5 ;
        /*0048*/                   STS.U16 [R7+0x2], R5 ;
        /*0050*/               @P1 BRA 0x30 ;
        /*0060*/                   LDSM.16.M88.4 R8, [R9] ;
        /*0070*/                   HMMA.16816.F32 R12, R8, R10, R12 ;
        /*0080*/                   HMMA.16816.F32 R16, R8, R11, R16 ;
        /*0090*/               @P2 BRA 0x10 ;
        /*00a0*/                   EXIT ;
"""


def test_steady_state_counts_one_k_tile_with_inner_loops_times_their_trips():
    instructions = parse_listing(LISTING)["k_kernel"]
    assert [i.base for i in instructions[:3]] == ["MOV", "BAR", "LDGSTS"]
    counts = steady_state(instructions, decoded_per_thread=8)  # 8 elements / 2 STS a trip = 4 trips
    assert counts == {"BAR": 1, "LDGSTS": 1, "LOP3": 4, "STS": 8, "BRA": 5, "LDSM": 1, "HMMA": 2}


def test_steady_state_needs_a_loop_with_mma_and_countable_inner_loops():
    instructions = parse_listing(LISTING)["k_kernel"]
    assert steady_state(instructions, decoded_per_thread=7) is None  # 7 elements, 2 STS a trip
    no_mma = parse_listing(LISTING.replace("HMMA.16816.F32", "FFMA"))["k_kernel"]
    assert steady_state(no_mma, decoded_per_thread=8) is None


def test_summary_per_weight_of_the_cta_tile():
    counts = steady_state(parse_listing(LISTING)["k_kernel"], decoded_per_thread=8)
    config = TileConfig(block_n=16, block_m=32, block_k=32, warps=2, stages=2)
    summary = summarize(counts, config)
    assert (summary["HMMA"], summary["INT"], summary["BAR"], summary["STS"]) == (2, 4, 1, 8)
    assert summary["instructions_per_weight"] == pytest.approx(22 * 64 / (32 * 32))


@pytest.mark.parametrize("bits, budget", [(16, 18.46), (6, 6.92), (5, 5.77), (4, 4.61)])
def test_weight_budget_is_about_1_15_instructions_per_bit(bits, budget):
    # 128 thread-instructions a clock against 3.35 TB/s / (132 SMs x 1.83 GHz) = 13.87 bytes a clock
    assert weight_budget(bits) == pytest.approx(budget, abs=0.01)


# A tile-scatter kernel by hand: the main loop (0x0010..0x0110) holds the phase loop (0x0030..0x00e0, a
# BAR in it: fill | scatter, each a branch), which holds the zero-fill loop (0x0050..0x0060, one 16-byte
# STS) and the group loop (0x0070..0x00d0), which holds the loop over a word's set bits (0x0090..0x00c0).
SCATTER_LISTING = """
\tFunction : k_kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0020*/              @!P0 LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0030*/                   ISETP.NE.AND P0, PT, R2, RZ, PT ;
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0050*/                   STS.128 [R5], RZ ;
        /*0060*/               @P1 BRA 0x50 ;
        /*0070*/                   LDG.E.64.CONSTANT R6, desc[UR4][R8.64] ;
        /*0080*/                   POPC R10, R6 ;
        /*0090*/                   LDG.E.U16.CONSTANT R11, desc[UR4][R12.64] ;
        /*00a0*/                   LOP3.LUT R6, R6, R13, RZ, 0xc0, !PT ;
        /*00b0*/                   STS.U16 [R14], R11 ;
        /*00c0*/               @P2 BRA 0x90 ;
        /*00d0*/               @P3 BRA 0x70 ;
        /*00e0*/               @P4 BRA 0x30 ;
        /*00f0*/                   LDSM.16.M88.4 R8, [R9] ;
        /*0100*/                   HMMA.16816.F32 R12, R8, R10, R12 ;
        /*0110*/               @P5 BRA 0x10 ;
        /*0120*/                   EXIT ;
"""


def test_scatter_steady_state_weights_each_loop_by_its_trips():
    """By hand: main-loop code once, the phase loop's once (its phases are branches), the fill 4 / 1 STS
    = 4 times, the group loop 2 times, the set-bit loop 5.5 times (the busiest lane's bits of a word, per
    K tile: a mean over warps)."""
    instructions = parse_listing(SCATTER_LISTING)["k_kernel"]
    counts = scatter_steady_state(instructions, ScatterTrips(groups=2, word_elements=5.5, fill_stores=4, vector=2))
    assert counts == {
        "BAR": 1 + 1, "LDGSTS": 1, "ISETP": 1, "STS": 4 + 5.5, "BRA": 1 + 1 + 4 + 2 + 5.5,
        "LDG": 2 + 5.5, "POPC": 2, "LOP3": 5.5, "LDSM": 1, "HMMA": 1,
    }  # fmt: skip


def test_scatter_steady_state_of_a_word_per_element():
    """Without bitmap words (Tiled-CSL) the innermost loop with 2-byte stores is the group loop itself:
    groups x vector elements, unrolled here to 1 store a trip of a 4-word group: 2 x 4 / 1 = 8 trips."""
    flat = SCATTER_LISTING.replace("@P3 BRA 0x70", "NOP").replace("LDG.E.64.CONSTANT", "IADD3")
    counts = scatter_steady_state(parse_listing(flat)["k_kernel"], ScatterTrips(2, None, 4, vector=4))
    assert counts is not None and counts["STS"] == 4 + 8 and counts["LOP3"] == 8
