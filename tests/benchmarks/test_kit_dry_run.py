"""The GPU kit's dry mode end to end: prepare a CPU-built kit, run it, and find its results.

A GPU session is rare and short; this proves here that the kit a GPU session carries is complete
(kernels, runtime bundle, manifest; the gpu tests, the dense / FPx GEMM benchmark, the sparse (bitmap,
tiled-csl) GEMM benchmark and the quantised-KV attention benchmark find what they need and their outputs are right). The
dry kernels are the same schedules built for the CPU, so the gpu tests in it check real numbers
against torch. The decoder part has its own dry run (benchmarks/kit/decoder_run.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.kit.cases import kept_per_row  # noqa: E402


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
    bitmap_tests = [name for name in tests["tests"] if "bitmap" in name]
    assert bitmap_tests and all(tests["tests"][name] == "passed" for name in bitmap_tests)

    (sparse_json,) = out.glob("sparse_gemm_gpu_*.json")
    sparse = json.loads(sparse_json.read_text())
    section = manifest["sparse_bench"]
    expected = {(layer, s, "random", n) for layer, spec in section.items() for s in spec["sparsities"]
                for n in spec["tokens"]}  # fmt: skip
    wanda = {(layer, s, "wanda", n) for layer, spec in section.items() for s in spec["wanda"]["sparsities"]
             for n in spec["wanda"]["tokens"]}  # fmt: skip
    assert wanda and {(p["layer"], p["sparsity"], p["mask"], p["n"]) for p in sparse["summary"]} == expected | wanda
    for point in sparse["summary"]:
        assert not point["incorrect_kernels"] and point["best"]["rel_error"] < 2e-3, point
        kept = point["m"] * kept_per_row(point["k"], point["sparsity"])
        assert point["nonzeros"] == kept and point["stored_bytes"] < point["m"] * point["k"] * 2
    fpx_points = [p for p in sparse["summary"] if "sparse_fpx" in p]  # sparse x FP6 at 80%
    assert {(p["layer"], p["n"]) for p in fpx_points} == {
        (layer, n) for layer, spec in section.items() if "fpx" in spec for n in spec["tokens"]
    } and fpx_points
    for point in fpx_points:
        fpx = point["sparse_fpx"]
        assert not fpx["incorrect_kernels"] and fpx["best"]["rel_error"] < 2e-3, point
        assert fpx["stored_bytes"] < point["stored_bytes"] and fpx["ideal_speedup"] > point["ideal_speedup"]
    csl_points = [p for p in sparse["summary"] if "tiled_csl" in p]  # tiled-csl on the same pruned W
    csl_expected = {(layer, s, n) for layer, spec in section.items() for s in spec["tiled_csl"]["sparsities"]
                    for n in spec["tokens"]}  # fmt: skip
    assert {(p["layer"], p["sparsity"], p["n"]) for p in csl_points} == csl_expected and csl_points
    for point in csl_points:
        csl = point["tiled_csl"]
        assert csl["format"] == "tiled-csl" and not csl["incorrect_kernels"] and csl["best"]["rel_error"] < 2e-3, point
        assert 4 * point["nonzeros"] <= csl["stored_bytes"] < point["m"] * point["k"] * 2

    (kv_json,) = out.glob("kv_attention_gpu_*.json")
    kv = json.loads(kv_json.read_text())
    kv_section = manifest["kv_bench"]
    assert {c["format"] for c in kv["checks"]} == set(kv_section["formats"]) == {"fp16", "int8", "int4", "int2-kitty"}
    assert all(c["correct"] for c in kv["checks"]), [c for c in kv["checks"] if not c["correct"]]
    cases = len(kv_section["formats"]) * len(kv_section["configs"]) * len(kv_section["batches"])
    quantised_checks = [c for c in kv["checks"] if "rel_error" in c]  # numpy-quantised, vs fp32 SDPA
    assert len(quantised_checks) == cases and all(c["rel_error"] < 2e-3 for c in quantised_checks)
    timed = {(r["format"], r["group"], r["batch"], r["context"]) for r in kv["rows"]}
    assert len(timed) == len(kv["rows"]) == cases * len(kv_section["contexts"])
    assert all(r["ours_ms"] > 0 and r["kv_bytes"] > 0 for r in kv["rows"])
    assert set(manifest["device_estimate"]) == {"gemm", "sparse", "kv"}
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back
