"""The weight-format registry: names, pack/unpack against the numpy formats, bytes, fp6-auto, mse."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tensorpress.compiler.formats import WEIGHT_FORMATS, DenseFormat, get_weight_format, weight_format_names
from tensorpress.compiler.formats import fpx_codes as fpx
from tensorpress.compiler.formats.fpx import FPxAutoFormat, FPxFormat
from tensorpress.errors import ConfigError


def gaussian(m=64, k=128, seed=0):
    return np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32)


def test_names_and_aliases():
    names = weight_format_names()
    for name in ["fp6", "fp6_e2m3", "fp5", "fp4", "e3m2", "e2m3", "e2m2", "e3m1", "e2m1", "fp6-auto"]:
        assert name in names
    assert {"dense-fp16", "dense-fp32"} <= set(names)
    bits = {name: (f.ebits, f.mbits) for name, f in WEIGHT_FORMATS.items() if isinstance(f, FPxFormat)}
    assert bits["fp6"] == (3, 2) and bits["fp6_e2m3"] == (2, 3)
    assert bits["fp5"] == (2, 2) and bits["fp4"] == (2, 1) and bits["e3m1"] == (3, 1)


def test_unknown_names_and_searches_list_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        get_weight_format("fp7")
    assert "fp7" in str(err.value) and "fp6-auto" in str(err.value) and "dense-fp16" in str(err.value)
    with pytest.raises(ConfigError) as err:
        get_weight_format("fp6", scale_search="percentile")
    assert "absmax" in str(err.value) and "mse" in str(err.value)


@pytest.mark.parametrize("name", ["fp6", "fp6_e2m3", "fp5", "fp4", "e3m1", "e4m3", "e1m2"])
@pytest.mark.parametrize("scale_search", ["absmax", "mse"])
def test_fpx_pack_unpack_is_decode_of_encode(name, scale_search):
    fmt = get_weight_format(name, scale_search)
    w = gaussian(48, 80) * np.float32(3.0)
    packed = fmt.pack(w)
    assert packed.format == f"e{fmt.ebits}m{fmt.mbits}" and packed.shape == (48, 80)
    assert list(packed.arrays)[-1] == "scales"
    encode = fpx.encode_mse if scale_search == "mse" else fpx.encode
    codes, scales = encode(w, fmt.ebits, fmt.mbits)
    np.testing.assert_array_equal(packed.arrays["scales"], scales)
    expected = fpx.decode(codes, scales, fmt.ebits, fmt.mbits)
    got = fmt.unpack(packed)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(fmt.roundtrip(w), expected)


def test_dense_formats():
    w = gaussian()
    np.testing.assert_array_equal(get_weight_format("dense-fp32").roundtrip(w), w)
    np.testing.assert_array_equal(get_weight_format("dense-fp16").roundtrip(w), w.astype(np.float16).astype(np.float32))
    assert get_weight_format("dense-fp16", "mse") == DenseFormat("dense-fp16", "float16")


# Formats whose stored bytes follow from the shape (a sparse format's depend on its nonzeros: its own tests)
SHAPE_SIZED = sorted(name for name, fmt in WEIGHT_FORMATS.items() if not fmt.sparse)


@pytest.mark.parametrize("name", SHAPE_SIZED)
def test_stored_bytes_match_the_packed_arrays(name):
    fmt = WEIGHT_FORMATS[name]
    for m, k in [(64, 128), (16, 16), (80, 96)]:
        assert fmt.stored_bytes(m, k) == fmt.pack(gaussian(m, k)).nbytes, (name, m, k)


def test_stored_bytes_by_hand():
    m, k = 128, 256  # a whole number of tiles: no padding
    assert get_weight_format("fp6").stored_bytes(m, k) == m * k * 6 // 8 + 2 * m
    assert get_weight_format("fp5").stored_bytes(m, k) == m * k * 5 // 8 + 2 * m
    assert get_weight_format("fp4").stored_bytes(m, k) == m * k // 2 + 2 * m
    assert get_weight_format("fp6-auto").stored_bytes(m, k) == m * k * 6 // 8 + 2 * m
    assert get_weight_format("dense-fp16").stored_bytes(m, k) == m * k * 2
    # 16 x 16: rows are padded along K to 128 codes (fpx_layout.K_ALIGN), M is not padded.
    assert get_weight_format("fp6").stored_bytes(16, 16) == 16 * 128 * 6 // 8 + 2 * 16


def test_fp6_auto_picks_the_format_with_the_lower_error():
    auto = get_weight_format("fp6-auto")
    assert isinstance(auto, FPxAutoFormat)
    smooth = gaussian(64, 256)  # no outliers: e2m3's extra mantissa bit wins
    rng = np.random.default_rng(1)
    spiky = (rng.standard_normal((64, 256)) ** 5).astype(np.float32)  # heavy tails: e3m2's range wins
    for w, winner in [(smooth, "e2m3"), (spiky, "e3m2")]:
        errors = {}
        for ebits, mbits in [(3, 2), (2, 3)]:
            codes, scales = fpx.encode(w, ebits, mbits)
            errors[f"e{ebits}m{mbits}"] = fpx.reconstruction_error(w, codes, scales, ebits, mbits).sum()
        assert min(errors, key=errors.get) == winner
        assert auto.resolve(w).stage_name == winner
        packed = auto.pack(w)
        assert packed.format == winner
        np.testing.assert_array_equal(auto.unpack(packed), get_weight_format(winner).roundtrip(w))


def test_mse_scales_lower_the_error():
    w = gaussian(64, 256)
    for name in ["fp6", "fp6_e2m3", "fp5", "fp4"]:
        base = np.square(get_weight_format(name).roundtrip(w) - w).sum()
        searched = np.square(get_weight_format(name, "mse").roundtrip(w) - w).sum()
        assert searched < base, name


def test_unsupported_shapes():
    for name in ["fp6", "fp6-auto", "dense-fp16"]:
        fmt = get_weight_format(name)
        assert fmt.unsupported_reason(64, 4096) is None
        assert "16" in fmt.unsupported_reason(64, 100)


def test_registry_imports_no_tvm():
    code = "import sys, tensorpress.compiler.formats; print('tvm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dense_panel_round_trip_and_layout():
    from tensorpress.compiler.formats import get_weight_format

    w = np.arange(32 * 5, dtype=np.float32).reshape(32, 5)
    fmt = get_weight_format("dense-fp32-panel")
    packed = fmt.pack(w)
    assert packed.arrays["weight"].shape == (2, 5, 16)
    assert packed.arrays["weight"][1, 3, 7] == w[16 + 7, 3]  # W[m, k] = weight[m // 16, k, m % 16]
    np.testing.assert_array_equal(fmt.unpack(packed), w)
    assert fmt.stored_bytes(32, 5) == packed.nbytes
    ragged = fmt.pack(w[:24])  # any M: the last panel is zero padded
    np.testing.assert_array_equal(fmt.unpack(ragged), w[:24])
    assert fmt.unsupported_reason(24, 16) is None and fmt.stored_bytes(24, 5) == ragged.nbytes


@pytest.mark.parametrize("name", SHAPE_SIZED)
def test_code_bits_are_what_the_packed_weight_spends_per_weight(name):
    # scales (2 bytes a row) and K padding aside, a packed [M, K] weight holds code_bits per weight
    fmt = WEIGHT_FORMATS[name]
    m, k = 64, 1024
    packed = fmt.pack(np.random.default_rng(1).standard_normal((m, k)).astype(np.float32))
    scales = sum(a.nbytes for n, a in packed.arrays.items() if n == "scales")
    assert (packed.nbytes - scales) * 8 == fmt.code_bits() * m * k
