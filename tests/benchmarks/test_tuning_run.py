"""The GPU kit's tuning part, dry (CPU-built kernels): prepare.py --tuning, run.py --only tune and the import
work together; on sparse kernels, bitmap and bitmap-e3m2 weights are made on the device side at the density
that fills the recorded buffers, and every candidate computes X · Wᵀ (a trial with a time, not a failure).
Both slow; tests/compiler/tuning/test_tuning_kit.py covers the same path through `tune --target cuda` by
default."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from benchmarks.kit.build import bitmap_buffers, bitmap_fpx_buffers  # noqa: E402


@pytest.mark.slow  # 118 s at load 8: the CPU replays of the sparse decode stages build slowly
def test_sparse_kernels_are_timed_on_weights_that_fill_their_recorded_buffers(tmp_path):
    from benchmarks.kit.tuning_run import run_tuning
    from tensorpress.compiler.formats import decode_stage
    from tensorpress.compiler.targets import TargetSpec
    from tensorpress.compiler.tuning.records import kernel_key
    from tensorpress.compiler.tuning.tuning_kit import KitKernel, write_tuning_kit
    from tensorpress.schedules.template_config import TENSORCORE_WEIGHT_GEMM, kernel_signature
    from tensorpress.schedules.weight_gemm import N_HINT_ATTR, make_weight_gemm

    target = TargetSpec("cuda", "sm_90a")
    kernels = []
    for fmt, buffers in (("bitmap", bitmap_buffers(128, 256)), ("bitmap-e3m2", bitmap_fpx_buffers(128, 256))):
        func = make_weight_gemm(decode_stage(fmt), 128, 256, buffers=buffers).with_attr(N_HINT_ATTR, 16)
        key = kernel_key(kernel_signature(func), TENSORCORE_WEIGHT_GEMM, target)
        kernels.append(KitKernel(fmt, func, [(16, key)]))
    write_tuning_kit(tmp_path / "kit", kernels, target, count=2, dry=True)
    results = json.loads(run_tuning(tmp_path / "kit", tmp_path / "out", dry=True, log=lambda line: None).read_text())
    assert [p["format"] for p in results["points"]] == ["bitmap", "bitmap-e3m2"]
    trials = [r for r in results["rows"] if r["type"] == "trial"]
    assert len(trials) == 4 and all(r["seconds"] and r["seconds"] > 0 for r in trials), trials
    assert all(p["best_seconds"] and p["failed"] == 0 for p in results["points"])


@pytest.mark.slow  # 68 s at load 10 (two interpreters, TVM and torch imports, the runtime bundle)
def test_the_gpu_kits_tuning_part_prepares_runs_and_imports_dry(tmp_path):
    """The three commands of prepare.py's docstring, dry: prepare.py --tuning, run.py --only tune, the import."""
    import subprocess

    from tensorpress.compiler.tuning.kit_import import import_kit_results

    kit, out = tmp_path / "kit", tmp_path / "out"
    prepare = [sys.executable, "benchmarks/kit/prepare.py", "--tuning", "--dry", "--out", str(kit)]
    printed = subprocess.run(prepare, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    assert "device estimate, tuning part:" in printed and "--only tune" in printed
    estimate = json.loads((kit / "manifest.json").read_text())["device_estimate"]["tuning"]
    assert 0 < estimate["expected_s"] <= estimate["bound_s"]
    run = [sys.executable, "benchmarks/kit/run.py", "--kit", str(kit), "--only", "tune", "--out", str(out)]
    proc = subprocess.run(run, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = out.glob("tuning_*.json")
    points = json.loads(results.read_text())["points"]
    assert {(p["format"], p["tokens"]) for p in points} == {(f, n) for f in ("dense-fp16", "e3m2") for n in (1, 16)}
    report = import_kit_results(out, tmp_path / "log")
    assert report.best == 4 and not report.skipped
