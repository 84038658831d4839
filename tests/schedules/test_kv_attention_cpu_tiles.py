"""The CPU attention's register tiles (`schedules/kv_attention_cpu.py`): q·k over up to 4 heads × vectors of
positions, p·V over up to 4 heads × channels. Group sizes whose heads do not fill a tile of 4 (1, 2, 3, 6),
head dims whose channels do not fill one (72: a tile of 2 or 6 channels), chunks of an odd number of slot
steps (24 = 3 steps): each kernel, built as the compiler builds it for the CPU, agrees with softmax
attention (numpy, float64) and with the chunked form in float32 at its chunk; a rerun gives the same bits."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from kv_reference import attention_reference, chunked_attention_reference, paged_batch
from tvm.s_tir import dlight as dl

from tensorpress.compiler.formats import get_kv_cache_format
from tensorpress.schedules.kv_attention import kv_attention_rules, paged_attention_func

AUTO = get_kv_cache_format("auto")
CPU = tvm.target.Target({"kind": "llvm", "num-cores": 2})


def _decode_kernel(heads: int, kv_heads: int, head_dim: int, chunk: int):
    func = paged_attention_func(AUTO, heads, kv_heads, head_dim, 16, "float32", "decode", chunk=chunk)
    mod = tvm.IRModule({"decode": func.with_attr("global_symbol", "decode")})
    with CPU:
        mod = dl.ApplyDefaultSchedule(*kv_attention_rules())(mod)
        return tvm.compile(mod, target=CPU)["decode"]


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, chunk",
    [
        (32, 4, 128, 128),  # G8: two tiles of 4 heads, 2 channels / 2 vectors of positions
        (16, 4, 128, 24),  # G4: one tile of heads; 3 slot steps per chunk
        (4, 2, 128, 128),  # G2: tiles of 2 heads x 4 channels / 4 vectors
        (4, 4, 72, 24),  # G1: 1 head x 8 channels / 3 vectors (8 do not divide the 3 of a chunk)
        (6, 2, 72, 128),  # G3: 3 heads x 2 channels / 2 vectors
        (12, 2, 96, 16),  # G6: 3 heads x 2, two tiles of heads; chunks of 2 steps
    ],
)
def test_register_tiles_match_numpy_and_rerun_bit_identical(heads, kv_heads, head_dim, chunk):
    rng = np.random.default_rng(heads * head_dim + chunk)
    batch = paged_batch(rng, heads, kv_heads, head_dim, 16, [300, 1, 129, 17], [1, 1, 1, 1])
    kernel = _decode_kernel(heads, kv_heads, head_dim, chunk)
    args = [tvm.runtime.tensor(a) for a in batch.arrays()]
    outs = []
    for _ in range(2):
        out = tvm.runtime.tensor(np.full(batch.q.shape, np.nan, np.float32))
        kernel(*args, batch.layer, out)
        outs.append(out.numpy())
    np.testing.assert_allclose(outs[0], attention_reference(batch), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(outs[0], chunked_attention_reference(batch, chunk), rtol=2e-6, atol=2e-6)
    assert np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32))
