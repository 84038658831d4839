"""The sparse x FPx code stream (`compiler/formats/code_stream.py`): sequential bit planes checked bit by
bit against the docstring's picture for every plane width, unpack inverting pack, and the plane shapes."""

from __future__ import annotations

import numpy as np
import pytest

from tensorpress.compiler.formats import code_stream


@pytest.mark.parametrize("bits", [2, 4, 5, 6, 7, 8])  # planes 2, 4, 4+1, 4+2, 4+2+1, 8
def test_code_i_is_the_ith_field_of_each_plane(bits):
    rng = np.random.default_rng(bits)
    stream = rng.integers(0, 1 << bits, 96).astype(np.uint8)
    planes = code_stream.pack_planes(stream, bits)
    shift = 0
    for width in (8, 4, 2, 1):
        if not bits & width:
            continue
        words = [int(w) for w in planes[f"plane{width}"][0]]
        assert planes[f"plane{width}"].shape == code_stream.plane_shape(96, width) == (1, 96 * width // 32)
        for i, code in enumerate(stream):
            first = i * width  # the stream's bits, bit 0 of word 0 first
            field = sum(((words[(first + b) // 32] >> ((first + b) % 32)) & 1) << b for b in range(width))
            assert field == (int(code) >> shift) & ((1 << width) - 1), (width, i)
        shift += width
    np.testing.assert_array_equal(code_stream.unpack_planes(planes, bits), stream)
