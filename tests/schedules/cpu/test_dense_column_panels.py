"""Dense column panels (`compiler/formats/dense_column_panels.py`): the numpy packer and the CPU GEMM
reading the panels in place agree bit for bit."""

import numpy as np
import pytest
from cpu_schedule_harness import compiled, rng, schedule

from tensorpress.compiler.formats import decode_stage, get_weight_format
from tensorpress.compiler.formats.dense_column_panels import PANEL_WIDTH, pack_dense_panel
from tensorpress.schedules.cpu.weight_gemm import WeightGemm
from tensorpress.schedules.weight_gemm import make_weight_gemm


def test_packer_layout_is_column_panels():
    w = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    panels = pack_dense_panel(w)
    assert panels.shape == (2, 3, PANEL_WIDTH)
    for m in range(32):
        for k in range(3):
            assert panels[m // 16, k, m % 16] == w[m, k]


def test_ragged_rows_pad_the_last_panel_with_zeros():
    w = rng(1).standard_normal((20, 4)).astype(np.float32)
    panels = pack_dense_panel(w)
    assert panels.shape == (2, 4, PANEL_WIDTH)
    np.testing.assert_array_equal(panels[1, :, 4:], 0)
    fmt = get_weight_format("dense-fp32-panel")
    np.testing.assert_array_equal(fmt.unpack(fmt.pack(w)), w)


@pytest.mark.parametrize("fmt, dtype", [("dense-fp32-panel", "float32"), ("dense-fp16-panel", "float16")])
def test_decode_reproduces_the_weight_exactly(fmt, dtype):
    # X = identity, no bias: Y[n, m] = W[m, n] with every product exact (x 1.0 or x 0.0).
    m, k = 48, 24
    w = rng(3).standard_normal((m, k)).astype(dtype).astype(np.float32)
    stage = decode_stage(fmt)
    assert stage.unsupported_reason(m, k) is None and stage.unsupported_reason(40, k) is None
    call = compiled(schedule(WeightGemm(), make_weight_gemm(stage, m, k, "float32", "float32", False)))
    (y,) = call([np.eye(k, dtype=np.float32), pack_dense_panel(w, dtype)], [((k, m), "float32")])
    np.testing.assert_array_equal(y, w.T)
