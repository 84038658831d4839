"""The GPU kit's dry mode end to end: prepare a CPU-built kit, run it, and find its results.

A GPU session is rare and short; this proves here that the kit a GPU session carries is complete
(kernels, runtime bundle, manifest, the gpu tests and the GEMM benchmark find what they need). The
dry kernels are the same schedules built for the CPU, so the gpu tests in it check real numbers
against torch. The decoder part has its own dry run (benchmarks/kit/decoder_run.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dry_kit_prepares_runs_its_gpu_tests_and_benchmark(tmp_path):
    kit, out = tmp_path / "kit", tmp_path / "out"
    prepare = [sys.executable, "benchmarks/kit/prepare.py", "--dry", "--no-decoders", "--out", str(kit)]
    subprocess.run(prepare, cwd=ROOT, check=True, capture_output=True, text=True)
    manifest = json.loads((kit / "manifest.json").read_text())
    assert manifest["dry"] and (kit / "runtime" / "python" / "tensorpress" / "runtime").is_dir()

    run = [sys.executable, "benchmarks/kit/run.py", "--kit", str(kit), "--out", str(out), "--skip-decoders"]
    proc = subprocess.run(run, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    (tests_json,) = out.glob("gpu_tests_*.json")
    tests = json.loads(tests_json.read_text())
    assert tests["failed"] == 0 and tests["passed"] >= 10, tests["tests"]
    (bench_json,) = out.glob("gemm_weight_*.json")
    bench = json.loads(bench_json.read_text())
    assert bench["summary"] and not any(s["incorrect_kernels"] for s in bench["summary"])
    assert {s["layer"].split()[0] for s in bench["summary"]} >= {"dry", "fp6", "fp5", "fp4"}
