"""Where the elements of a 16×16 fp16 tile live in a warp's registers for mma.sync m16n8k16.

A warp keeps each 16×16 operand tile (A, B) as a buffer of [32 lanes, 8 slots] of 16-bit values, and
each 16×16 accumulator tile as [2 halves, 32 lanes, 4 regs] of fp32: half h is the C/D operand of the
h-th mma (cols 8h..8h+7), so every mma owns one contiguous [32, 4] block. The GEMM tile of one warp
step is

    C[16 rows, 16 cols] += A[16 rows, 16 k] · B[16 cols, 16 k]ᵀ       (two m16n8k16 mma, cols 0-7 / 8-15)

In the weight GEMM, A rows are tokens (X), B rows are weight rows (W, K-contiguous, PTX ".col"),
C is [token, weight row].

PTX facts this module encodes (PTX ISA, "Matrix fragments for mma.m16n8k16", .f16 inputs, .f32
accumulators); g = lane // 4, t = lane % 4:

    A 16×16 .row  register a_i (i = 0..7) = A[g + 8·((i // 2) % 2), 2t + i % 2 + 8·(i // 4)]
    B 16×8  .col  register b_i (i = 0..3) = B[k = 2t + i % 2 + 8·(i // 2), n = g]
    C 16×8        register c_i (i = 0..3) = C[g + 8·(i // 2), 2t + i % 2]

    ldmatrix.x4 (no .trans): lane L gives the address of row L % 8 of matrix L // 8; lane t then
    receives row t // 4, columns 2·(t % 4) + {0, 1} of matrix j in its register j (slots 2j, 2j+1).

The two mma of a 16×16 tile use B slots 0-3 and C half 0 (cols 0-7), then B slots 4-7 and C half 1
(cols 8-15). Which 8×8 matrix
of a tile each ldmatrix lane addresses therefore follows from the register order (a0a1 a2a3 a4a5 a6a7
and b0b1 b2b3 of each half):

    A tile (rows × k)        B tile (cols × k)
    ┌────────┬────────┐      ┌────────┬────────┐
    │ m0     │ m2     │      │ m0     │ m1     │   m = ldmatrix matrix j,
    │ L 0-7  │ L16-23 │      │ L 0-7  │ L 8-15 │   L = lanes giving its 8 row addresses
    ├────────┼────────┤      ├────────┼────────┤
    │ m1     │ m3     │      │ m2     │ m3     │
    │ L 8-15 │ L24-31 │      │ L16-23 │ L24-31 │
    └────────┴────────┘      └────────┴────────┘

Every function takes and returns ints or TIR expressions alike (only +, *, //, %), so the same code
serves the TVMScript intrinsics, the index maps of the schedule, and the Python tests.
"""

from __future__ import annotations

from typing import Any

WARP_SIZE = 32
TILE = 16  # rows, cols and k of one warp-level tile
SLOTS = 8  # values per lane for one 16×16 tile

# --- PTX forward maps: (lane, register) -> element ------------------------------------------------


def ptx_a_element(lane: Any, reg: Any) -> tuple[Any, Any]:
    """(row, k) of the A (16×16, .row) element in register `reg` (0..7) of `lane`."""
    return lane // 4 + 8 * ((reg // 2) % 2), 2 * (lane % 4) + reg % 2 + 8 * (reg // 4)


def ptx_b_element(lane: Any, reg: Any) -> tuple[Any, Any]:
    """(k, n) of the B (16×8, .col) element in register `reg` (0..3) of `lane`."""
    return 2 * (lane % 4) + reg % 2 + 8 * (reg // 2), lane // 4


def ptx_c_element(lane: Any, reg: Any) -> tuple[Any, Any]:
    """(row, col) of the C/D (16×8, fp32) element in register `reg` (0..3) of `lane`."""
    return lane // 4 + 8 * (reg // 2), 2 * (lane % 4) + reg % 2


def b_pair_element(lane: Any, pair: Any) -> tuple[Any, Any]:
    """(col, k) of the first element of register pair `pair` (slots 2·pair, 2·pair + 1; 0..3) of `lane`
    in a 16(cols)×16(k) B tile: the pair is B[col, k] (low 16 bits) and B[col, k + 1] (high 16 bits),
    one 32-bit register of an mma: b0b1 (pair % 2 == 0) or b2b3 of the cols-0-7 (pair < 2) or cols-8-15 mma."""
    k, col = ptx_b_element(lane, 2 * (pair % 2))
    return col + 8 * (pair // 2), k


def ldmatrix_received(lane: Any, matrix: Any, half: Any) -> tuple[Any, Any]:
    """ldmatrix.x4 without .trans: (row, col) inside 8×8 `matrix` that `lane` gets in slot 2·matrix+half."""
    return lane // 4, 2 * (lane % 4) + half


# --- Register of a tile element (inverses of the maps above; the schedule's layouts) --------------


def a_register(row: Any, k: Any) -> tuple[Any, Any]:
    """(lane, slot) holding A[row, k] of a 16×16 A tile."""
    return 4 * (row % 8) + (k % 8) // 2, k % 2 + 2 * (row // 8) + 4 * (k // 8)


def b_register(col: Any, k: Any) -> tuple[Any, Any]:
    """(lane, slot) holding B[col, k] of a 16(cols)×16(k) B tile (cols 8-15 in slots 4-7)."""
    return 4 * (col % 8) + (k % 8) // 2, 4 * (col // 8) + 2 * (k // 8) + k % 2


def c_register(row: Any, col: Any) -> tuple[Any, Any, Any]:
    """(half, lane, reg) holding C[row, col] of a 16×16 accumulator tile."""
    return col // 8, 4 * (row % 8) + (col % 8) // 2, 2 * (row // 8) + col % 2


def c_element(half: Any, lane: Any, reg: Any) -> tuple[Any, Any]:
    """(row, col) of the accumulator value in register `reg` (0..3) of `lane` in `half`."""
    row, col = ptx_c_element(lane, reg)
    return row, col + 8 * half


# --- ldmatrix lane addresses (which tile row each lane points at) ---------------------------------


def a_lane_row(lane: Any) -> tuple[Any, Any]:
    """(row, first k) of the 16-byte tile row whose address `lane` gives for an A tile."""
    return lane % 16, 8 * (lane // 16)


def b_lane_row(lane: Any) -> tuple[Any, Any]:
    """(row, first k) of the 16-byte tile row whose address `lane` gives for a B tile."""
    return 8 * (lane // 16) + lane % 8, 8 * ((lane // 8) % 2)


# --- Index maps for sch.transform_layout of [..., rows, cols] warp buffers tiled by 16 -------------


def a_warp_layout(*index: Any) -> tuple[Any, ...]:
    *outer, i, j = index
    return (*outer, i // TILE, j // TILE, *a_register(i % TILE, j % TILE))


def b_warp_layout(*index: Any) -> tuple[Any, ...]:
    *outer, i, j = index
    return (*outer, i // TILE, j // TILE, *b_register(i % TILE, j % TILE))


def c_warp_layout(*index: Any) -> tuple[Any, ...]:
    *outer, i, j = index
    return (*outer, i // TILE, j // TILE, *c_register(i % TILE, j % TILE))
