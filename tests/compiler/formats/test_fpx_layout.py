"""The bit-plane layout: exact round trip, and the properties the kernel relies on, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from tensorpress.compiler.formats import fpx_layout as layout
from tensorpress.errors import TensorpressError

ALL_FORMATS = [(e, m) for e in range(1, 5) for m in range(8 - e)]


def test_plane_split():
    assert layout.plane_widths(6) == (4, 2) and layout.plane_shifts(6) == (0, 4)
    assert layout.plane_widths(5) == (4, 1) and layout.plane_shifts(5) == (0, 4)
    assert layout.plane_widths(4) == (4,)
    assert layout.plane_widths(7) == (4, 2, 1) and layout.plane_shifts(7) == (0, 4, 6)
    assert layout.plane_widths(8) == (8,)
    assert layout.plane_widths(3) == (2, 1) and layout.plane_widths(2) == (2,)


@pytest.mark.parametrize("ebits,mbits", ALL_FORMATS)
@pytest.mark.parametrize("shape", [(1, 1), (16, 48), (64, 64), (80, 200)])
def test_pack_unpack_round_trip(ebits, mbits, shape):
    bits = 1 + ebits + mbits
    rng = np.random.default_rng(bits * 100 + shape[1])
    codes = rng.integers(0, 2**bits, size=shape, dtype=np.uint8)
    planes = layout.pack_fpx_planes(codes, ebits, mbits)
    assert list(planes) == [f"plane{p}" for p in layout.plane_widths(bits)]
    for p, words in zip(layout.plane_widths(bits), planes.values()):
        assert words.dtype == np.uint32 and words.shape == (layout.plane_words(*shape, p),)
    np.testing.assert_array_equal(layout.unpack_fpx_planes(planes, *shape, ebits, mbits), codes)


def test_words_hold_the_codes_where_the_picture_says():
    """Single codes placed by hand from the docstring's picture (e3m2: plane4 low 4 bits, plane2 top 2)."""
    m, k = 128, 128  # two row tiles, two K tiles; one tile = 512 words of plane4, 256 of plane2
    cases = [  # (row, col), (word, bit) in plane4, (word, bit) in plane2
        ((0, 0), (0, 0), (0, 0)),
        ((0, 1), (0, 4), (0, 2)),
        ((0, 8), (0, 8), (0, 4)),  # K offset 8 is slot 2 (lane 0's third code)
        ((0, 2), (1, 0), (0, 16)),  # K offset 2 is slot 8, lane 1's first code
        ((0, 31), (3, 28), (1, 30)),  # slot 31
        ((1, 0), (4, 0), (2, 0)),  # next row: p words further
        ((0, 32), (256, 0), (128, 0)),  # second group of the tile: after 64 rows x p words
        ((0, 64), (512, 0), (256, 0)),  # tile (0, 1)
        ((64, 0), (1024, 0), (512, 0)),  # tile (1, 0), after both K tiles of row tile 0
        ((65, 97), (1536 + 256 + 4, 4), (768 + 128 + 2, 2)),  # tile (1, 1), group 1, row 1, slot 1
    ]
    for (row, col), (word4, bit4), (word2, bit2) in cases:
        codes = np.zeros((m, k), dtype=np.uint8)
        codes[row, col] = 0b10_1011
        planes = layout.pack_fpx_planes(codes, 3, 2)
        expected4 = np.zeros_like(planes["plane4"])
        expected4[word4] = 0b1011 << bit4
        expected2 = np.zeros_like(planes["plane2"])
        expected2[word2] = 0b10 << bit2
        np.testing.assert_array_equal(planes["plane4"], expected4, err_msg=str((row, col)))
        np.testing.assert_array_equal(planes["plane2"], expected2, err_msg=str((row, col)))


def test_a_lane_reads_one_contiguous_run_per_row():
    # mma.m16n8k16 A fragment: lane 4g+c holds K offsets 2c, 2c+1, 2c+8, 2c+9 of each k16 step.
    for c in range(4):
        ks = [
            16 * step + 8 * half + 2 * c + pair for step in range(2) for half in range(2) for pair in range(2)
        ]
        slots = sorted(int(layout.slot_in_group(kk)) for kk in ks)
        assert slots == list(range(8 * c, 8 * c + 8))
    assert sorted(layout.SLOT_TO_K.tolist()) == list(range(32))
    assert [int(layout.slot_in_group(int(kk))) for kk in layout.SLOT_TO_K] == list(range(32))


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_tiles_are_contiguous_and_lanes_read_without_bank_conflicts(width):
    m, k = 128, 192
    _, kp = layout.padded_shape(m, k)
    rows = np.arange(m)[:, None]
    cols = np.arange(k)[None, :]
    words = layout.word_index(rows, cols, width, kp)
    per_tile = layout.TILE_ROWS * layout.TILE_K * width // 32
    tile_id = rows // layout.TILE_ROWS * (kp // layout.TILE_K) + cols // layout.TILE_K
    assert (words // per_tile == tile_id).all()  # a tile's words are one run, tiles in row-major order
    # Lane 4g+c reads its 8 codes of row g (8p bits from its first word on). One shared-memory
    # wavefront serves 32 words: all lanes for p <= 4 (32-bit loads), a half warp for p = 8 (64-bit).
    lanes_per_wavefront = 32 if width <= 4 else 16
    for first_lane in range(0, 32, lanes_per_wavefront):
        banks: dict[int, set[int]] = {}
        for lane in range(first_lane, first_lane + lanes_per_wavefront):
            g, c = divmod(lane, 4)
            start = int(layout.word_index(g, 2 * c, width, kp))
            for word in range(start, start + max(1, 8 * width // 32)):
                banks.setdefault(word % 32, set()).add(word)
        assert all(len(ws) == 1 for ws in banks.values())  # shared words broadcast; no two rows clash


def test_bytes_and_errors():
    assert layout.padded_shape(1, 1) == (64, 64)
    assert layout.padded_shape(128, 65) == (128, 128)
    assert layout.plane_words(128, 256, 4) * 4 == 128 * 256 // 2
    assert layout.plane_words(128, 256, 2) * 4 == 128 * 256 // 4
    with pytest.raises(TensorpressError):
        layout.pack_fpx_planes(np.full((2, 2), 64, np.uint8), 3, 2)  # 7-bit value in a 6-bit format
    with pytest.raises(TensorpressError):
        layout.pack_fpx_planes(np.zeros((2, 2), np.int32), 3, 2)
    planes = layout.pack_fpx_planes(np.zeros((16, 16), np.uint8), 3, 2)
    with pytest.raises(TensorpressError):
        layout.unpack_fpx_planes(planes, 16, 128, 3, 2)  # planes of another shape
    assert layout.unsupported_shape_reason(48, 1024) is None
    assert "16" in layout.unsupported_shape_reason(40, 64)
