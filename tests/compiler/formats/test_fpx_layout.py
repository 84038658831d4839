"""The bit-plane layout: exact round trip, and the properties the kernel relies on, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from tensorpress.compiler.formats import fpx_layout as layout
from tensorpress.compiler.formats import get_weight_format
from tensorpress.errors import TensorpressError

ALL_FORMATS = [(e, m) for e in range(1, 5) for m in range(8 - e)]
WIDTHS = [1, 2, 4, 8]


def test_plane_split():
    assert layout.plane_widths(6) == (4, 2) and layout.plane_shifts(6) == (0, 4)
    assert layout.plane_widths(5) == (4, 1) and layout.plane_shifts(5) == (0, 4)
    assert layout.plane_widths(4) == (4,)
    assert layout.plane_widths(7) == (4, 2, 1) and layout.plane_shifts(7) == (0, 4, 6)
    assert layout.plane_widths(8) == (8,)
    assert layout.plane_widths(3) == (2, 1) and layout.plane_widths(2) == (2,)


@pytest.mark.parametrize("ebits,mbits", ALL_FORMATS)
@pytest.mark.parametrize("shape", [(1, 1), (16, 48), (64, 64), (80, 200), (3, 384)])
def test_pack_unpack_round_trip(ebits, mbits, shape):
    bits = 1 + ebits + mbits
    rng = np.random.default_rng(bits * 100 + shape[1])
    codes = rng.integers(0, 2**bits, size=shape, dtype=np.uint8)
    planes = layout.pack_fpx_planes(codes, ebits, mbits)
    assert list(planes) == [f"plane{p}" for p in layout.plane_widths(bits)]
    for p, words in zip(layout.plane_widths(bits), planes.values()):
        assert words.dtype == np.uint32 and words.shape == layout.plane_shape(*shape, p)
    np.testing.assert_array_equal(layout.unpack_fpx_planes(planes, *shape, ebits, mbits), codes)


def test_words_hold_the_codes_where_the_picture_says():
    """Single codes placed by hand from the docstring's picture (e3m2: plane4 low 4 bits, plane2 top 2).

    In a group, k = 2t + 8j + h sits at offset t*4p + j*p of half h: word offset // 16, bit
    16h + offset % 16. A row of 256 codes is 32 words of plane4 and 16 of plane2."""
    cases = [  # (row, col), (word, bit) in plane4, (word, bit) in plane2
        ((0, 0), (0, 0), (0, 0)),  # t=0 j=0 h=0
        ((0, 1), (0, 16), (0, 16)),  # the pair's odd code: 16 bits up, same word
        ((0, 8), (0, 4), (0, 2)),  # j=1: the next field of lane 0
        ((0, 2), (1, 0), (0, 8)),  # t=1: plane4 word 1; plane2 shares word 0 (bits 8..15)
        ((0, 3), (1, 16), (0, 24)),
        ((0, 4), (2, 0), (1, 0)),  # t=2: plane2 word 1
        ((0, 31), (3, 28), (1, 30)),  # t=3 j=3 h=1
        ((0, 32), (4, 0), (2, 0)),  # second group: p words further
        ((0, 64 + 26), (8 + 1, 12), (4 + 0, 14)),  # group 2, k=26: t=1 j=3 h=0
        ((1, 0), (32, 0), (16, 0)),  # next row: a row's worth of words further
        ((2, 255), (64 + 28 + 3, 28), (32 + 14 + 1, 30)),  # last code of row 2
    ]
    m, k = 3, 256
    for (row, col), (word4, bit4), (word2, bit2) in cases:
        codes = np.zeros((m, k), dtype=np.uint8)
        codes[row, col] = 0b10_1011
        planes = layout.pack_fpx_planes(codes, 3, 2)
        expected4 = np.zeros(m * 32, np.uint32)
        expected4[word4] = 0b1011 << bit4
        expected2 = np.zeros(m * 16, np.uint32)
        expected2[word2] = 0b10 << bit2
        np.testing.assert_array_equal(planes["plane4"].reshape(-1), expected4, err_msg=str((row, col)))
        np.testing.assert_array_equal(planes["plane2"].reshape(-1), expected2, err_msg=str((row, col)))
        for width, word, bit in [(4, word4 % 32, bit4), (2, word2 % 16, bit2)]:  # the index functions agree
            assert (layout.word_in_row(col, width), layout.bit_offset(col, width)) == (word, bit)


@pytest.mark.parametrize("width", WIDTHS)
def test_a_lane_reads_one_run_per_half_and_pairs_sit_16_bits_apart(width):
    # mma.m16n8k16 B fragment: lane 4g+t holds K offsets 2t, 2t+1, 2t+8, 2t+9 of each k16 step, so
    # over a group of 32 codes the 8 codes k = 2t + 8j + h, with (k, k + 1) in one half2 register.
    for lane in range(4):
        fields = {}
        for j in range(4):
            for h in range(2):
                k = 2 * lane + 8 * j + h
                word, bit = int(layout.word_in_row(k, width)), int(layout.bit_offset(k, width))
                fields[j, h] = word * 32 + bit
        for h in range(2):  # one contiguous run of 4p bits along the words' h halves, in j order
            run = [fields[j, h] // 32 * 16 + fields[j, h] % 32 - 16 * h for j in range(4)]
            assert run == list(range(run[0], run[0] + 4 * width, width))
        for j in range(4):  # the two codes of pair j: same word, 16 bits apart
            assert fields[j, 1] - fields[j, 0] == 16
        words = {fields[key] // 32 for key in fields}
        assert len(words) == max(1, width // 4)  # one word (plane8: two) holds the lane's 8 codes


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("block_k", [32, 64, 128])
def test_k_tiles_are_rectangles_of_whole_aligned_words(width, block_k):
    k = 384
    cols = np.arange(k)
    words = layout.word_in_row(cols, width)
    per_tile = block_k * width // 32
    for k0 in range(0, k, block_k):
        tile_words = np.unique(words[k0 : k0 + block_k])
        # the K tile is exactly the words [k0 p / 32, (k0 + block_k) p / 32) of every row
        np.testing.assert_array_equal(tile_words, np.arange(k0 * width // 32, k0 * width // 32 + per_tile))
    # every row starts 16-byte aligned, so a tile's row is whole cp.async chunks of min(16, its bytes)
    row_bytes = layout.row_words(k, width) * 4
    chunk = min(16, per_tile * 4)
    assert row_bytes % 16 == 0 and (per_tile * 4) % chunk == 0


@pytest.mark.parametrize("width", WIDTHS)
def test_a_warp_decoding_32_consecutive_codes_reads_p_words(width):
    # The template's cooperative decode: a warp's 32 lanes take 32 consecutive columns of one row,
    # starting at a multiple of 32. They touch only the p words of one group (shared-memory
    # broadcasts, no bank conflict), whichever group it is.
    for start in (0, 32, 96):
        words = {int(w) for w in layout.word_in_row(np.arange(start, start + 32), width)}
        first = start // 32 * width
        assert words == set(range(first, first + width))


def test_bytes_and_errors():
    assert layout.padded_k(1) == 128 and layout.padded_k(128) == 128 and layout.padded_k(129) == 256
    assert layout.plane_shape(48, 200, 4) == (48, 32) and layout.plane_shape(48, 200, 1) == (48, 8)
    assert layout.plane_words(128, 256, 4) * 4 == 128 * 256 // 2
    assert layout.plane_words(128, 256, 2) * 4 == 128 * 256 // 4
    # what the registry counts is what it packs: 6 bits a weight plus 2 bytes a row, padding included
    for name, m, k in [("fp6", 128, 256), ("fp5", 48, 80), ("fp4", 16, 4096), ("e4m3", 32, 384)]:
        fmt = get_weight_format(name)
        packed = fmt.pack(np.random.default_rng(0).standard_normal((m, k)).astype(np.float32))
        assert fmt.stored_bytes(m, k) == packed.nbytes
    assert get_weight_format("fp6").stored_bytes(8192, 8192) == 8192 * 8192 * 6 // 8 + 2 * 8192
    with pytest.raises(TensorpressError):
        layout.pack_fpx_planes(np.full((2, 2), 64, np.uint8), 3, 2)  # 7-bit value in a 6-bit format
    with pytest.raises(TensorpressError):
        layout.pack_fpx_planes(np.zeros((2, 2), np.int32), 3, 2)
    planes = layout.pack_fpx_planes(np.zeros((16, 16), np.uint8), 3, 2)
    with pytest.raises(TensorpressError, match="repack"):
        layout.unpack_fpx_planes(planes, 16, 256, 3, 2)  # planes of another shape
    assert layout.unsupported_shape_reason(48, 1024) is None
    assert "16" in layout.unsupported_shape_reason(40, 64)


def test_decode_position_runs_of_eight_read_one_word_of_each_plane():
    cols = np.arange(256)
    positions = layout.decode_position(cols)
    assert sorted(positions) == list(cols)  # a permutation
    assert np.array_equal(layout.decode_position(positions), cols)  # its own inverse
    assert np.array_equal(positions // 32, cols // 32)  # within each group
    run_cols = layout.decode_position(cols).reshape(-1, layout.DECODE_RUN)  # the columns of each run, in order
    for width in (4, 2, 1):  # the planes of codes up to 7 bits
        words = layout.word_in_row(run_cols, width)
        assert (words == words[:, :1]).all(), width  # one word per run
        offsets = layout.bit_offset(run_cols, width)
        # a run's offsets: one number per run plus the same pattern in every run (one per-lane shift)
        assert (offsets - offsets[:, :1] == offsets[0] - offsets[0, 0]).all(), width
