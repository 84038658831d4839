"""The SASS steady-state count and the H100 issue budget, on a hand-written listing."""

from __future__ import annotations

import pytest

from tensorpress.schedules.tensorcore.tile_config import TileConfig
from tensorpress.schedules.verification.sass_cost import parse_listing, steady_state, summarize, weight_budget

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
