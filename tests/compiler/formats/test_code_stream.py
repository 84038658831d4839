"""The sparse x FPx code stream (`compiler/formats/code_stream.py`): codes back to back in one bit string,
checked bit by bit against the docstring's picture for every code width, and unpack inverting pack."""

from __future__ import annotations

import numpy as np
import pytest

from tensorpress.compiler.formats import code_stream


@pytest.mark.parametrize("bits", [2, 4, 5, 6, 7, 8])
def test_code_i_is_bits_i_b_onwards_of_the_stream(bits):
    rng = np.random.default_rng(bits)
    stream = rng.integers(0, 1 << bits, 96).astype(np.uint8)
    codes = code_stream.pack_stream(stream, bits)
    assert codes.dtype == np.uint32 and codes.shape == code_stream.stream_shape(96, bits) == (1, 96 * bits // 32)
    words = [int(w) for w in codes[0]]
    for i, code in enumerate(stream):
        first = i * bits  # the stream's bits, bit 0 of word 0 first
        assert sum(((words[(first + b) // 32] >> ((first + b) % 32)) & 1) << b for b in range(bits)) == code, i
    np.testing.assert_array_equal(code_stream.unpack_stream(codes, bits), stream)
