"""benchmarks/sparse_gemm_cpu.py --quick runs end to end: every side agrees with torch on the pruned weight
and the JSON holds a row per token count and thread count (a smoke test, no timing asserted)."""

from __future__ import annotations

import json

import pytest

from benchmarks import sparse_gemm_cpu


@pytest.mark.slow
def test_quick_mode_writes_agreeing_rows(tmp_path):
    out = tmp_path / "sparse.json"
    assert sparse_gemm_cpu.main(["--quick", "--threads", "1", "--tokens", "1,5", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["n"], r["threads"]) for r in result["rows"]] == [(1, 1), (5, 1)]
    for row in result["rows"]:
        assert row["rel_error"] < 1e-5 and row["dense_rel_error"] < 1e-5
        assert row["ours_weight_bytes"] == 512 * (1024 - int(0.8 * 1024)) * 4  # 4 B a kept weight
        assert row["ours_ms"] > 0 and row["torch_ms"] > 0
