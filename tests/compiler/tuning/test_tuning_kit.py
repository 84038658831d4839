"""CUDA tuning through the GPU kit, without a GPU: `tensorpress tune --target cuda:sm_90a --dry-kit` builds a
tuning kit of a small MLP's Tensor Core kernels (CPU-built, as the GPU kit's dry run) and prints the device
command; the kit's tuning part times it here (benchmarks/kit/tuning_run.py); `tune --import-kit` appends its
rows to a log; `compile --target cuda:sm_90a --tuning-log` then schedules every kernel with the imported
best config (checked in the manifest's kernel_configs, not by timing). A wrong candidate is a failed trial,
never the best; a zero budget times only the defaults; bad input is one sentence and exit status 1."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
from reference_models import export_onnx

import tensorpress
from tensorpress.compiler.tuning.records import RECORDS_FILE, key_text
from tensorpress.schedules.tensorcore.arch import arch_spec
from tensorpress.schedules.tensorcore.tile_config import TileConfig

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _cli(*args: str) -> tuple[int, str]:
    from tensorpress.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(list(args))
    return status, out.getvalue()


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """(onnx path, the kit folder, the tune command's stdout, the dry device part's results JSON path)."""
    from benchmarks.kit.tuning_run import run_tuning

    folder = tmp_path_factory.mktemp("cudatune")
    onnx_path = export_onnx("mlp", folder)
    status, stdout = _cli("tune", str(onnx_path), "--target", "cuda:sm_90a", "--dry-kit", "--kit", str(folder / "kit"),
                          "--trials", "3")  # fmt: skip
    assert status == 0
    results = run_tuning(folder / "kit", folder / "out", dry=True, log=lambda line: None)
    return onnx_path, folder / "kit", stdout, results


def test_tune_for_cuda_without_a_gpu_prepares_a_kit_and_prints_the_device_command(kit):
    _, folder, stdout, _ = kit
    assert f'python3 benchmarks/kit/run.py --kit {folder} --only tune --out "$OUT"' in stdout
    assert "tensorpress tune --import-kit RESULTS_FOLDER --log tuning_logs/sm_90a" in stdout
    manifest = json.loads((folder / "manifest.json").read_text())
    section = manifest["tuning"]
    assert manifest["dry"] and section["arch"] == "sm_90a" and len(section["kernels"]) == 2  # fc1, fc2
    for kernel in section["kernels"]:
        assert (folder / kernel["library"]).is_file() and len(kernel["candidates"]) == 3
        for candidate in kernel["candidates"]:
            config = TileConfig(**candidate["config"])
            config.validate(arch_spec("sm_90a"))
            config.check_shape(kernel["m"], kernel["k"])
        for point in kernel["points"]:
            assert point["key"]["arch"] == "sm_90a" and point["key"]["m"] == kernel["m"]


def test_the_device_timings_import_as_records_that_compile_applies(kit, tmp_path):
    onnx_path, _, _, results = kit
    log = tmp_path / "log"
    status, stdout = _cli("tune", "--import-kit", str(results.parent), "--log", str(log))
    assert status == 0 and "(2 finished kernels)" in stdout and "95% s" in stdout  # + the per-point table
    rows = json.loads(results.read_text())["rows"]
    records = [json.loads(line) for line in (log / RECORDS_FILE).read_text().splitlines()]
    assert [(r["type"], r["key"], r["config"], r["seconds"]) for r in records] == [
        (r["type"], r["key"], r["config"], r["seconds"]) for r in rows
    ]
    best = {key_text(r["key"]): r["config"] for r in rows if r["type"] == "best"}
    assert len(best) == 2
    status, stdout = _cli("tune", "--import-kit", str(results), "--log", str(log))  # again: nothing twice
    assert status == 0 and "imported 0 records" in stdout and f"{len(rows)} already there" in stdout

    report = tensorpress.compile(onnx_path, tmp_path / "m.tpk", target="cuda:sm_90a", tuning_log=log)
    configs = report.manifest["kernel_configs"]
    assert len(configs) == 2
    assert {c["origin"] for c in configs.values()} == {str((log / RECORDS_FILE).resolve())}
    assert sorted(key_text(c["config"]) for c in configs.values()) == sorted(key_text(c) for c in best.values())


def test_a_wrong_candidate_is_a_failed_trial_and_no_budget_times_only_the_defaults(kit, tmp_path, monkeypatch):
    from benchmarks.kit import tuning_run

    _, folder, _, _ = kit
    real = tuning_run._functions

    def one_wrong(kit_folder, kernel, device_kind):
        functions = real(kit_folder, kernel, device_kind)
        return [functions[0], lambda *args: None, *functions[2:]]  # candidate 1 leaves Y unwritten (NaN)

    monkeypatch.setattr(tuning_run, "_functions", one_wrong)
    results = tuning_run.run_tuning(folder, tmp_path / "a", dry=True, log=lambda line: None)
    rows = json.loads(results.read_text())["rows"]
    manifest = json.loads((folder / "manifest.json").read_text())
    wrong = [k["candidates"][1]["config"] for k in manifest["tuning"]["kernels"]]
    trials = [r for r in rows if r["type"] == "trial"]
    assert all(r["seconds"] is None for r in trials if r["config"] in wrong)
    assert all(r["seconds"] > 0 for r in trials if r["config"] not in wrong)
    assert not any(r["config"] in wrong for r in rows if r["type"] == "best")

    monkeypatch.setattr(tuning_run, "_functions", real)
    timed = tuning_run.run_tuning(folder, tmp_path / "b", dry=True, budget_s=0, log=lambda line: None)
    points = json.loads(timed.read_text())["points"]
    assert [p["timed"] for p in points] == [1, 1] and all(p["cut_by_budget"] for p in points)
    defaults = [k["candidates"][k["points"][0]["default"]]["config"] for k in manifest["tuning"]["kernels"]]
    assert [p["best_config"] for p in points] == defaults


def test_bad_input_is_one_sentence(kit, tmp_path, capsys):
    onnx_path, folder, _, results = kit

    def error(*args: str) -> str:
        from tensorpress.cli import main

        assert main(list(args)) == 1
        stderr = capsys.readouterr().err
        lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in stderr and lines[0].endswith("."), stderr
        return lines[0]

    log = tmp_path / "log"
    assert "takes no model" in error("tune", str(onnx_path), "--import-kit", str(results), "--log", str(log))
    assert "--log" in error("tune", "--import-kit", str(results))
    assert "do not exist" in error("tune", "--import-kit", str(tmp_path / "nowhere"), "--log", str(log))
    assert "no tuning_" in error("tune", "--import-kit", str(tmp_path), "--log", str(log))
    assert "needs a model" in error("tune")
    rpc = ("--rpc-tracker", "h:1", "--rpc-key", "k")
    assert "GPU kit" in error("tune", str(onnx_path), "--target", "cuda:sm_90a", *rpc)
    assert "not a tuning kit" in error("tune", str(onnx_path), "--target", "cuda:sm_90a", "--kit", str(tmp_path))
    assert not log.exists()


def test_the_layer_tuning_part_keys_its_records_as_a_decoder_compile_keys_its_kernels():
    """The GPU kit's own tuning part (prepare.py --tuning) keys kernels made from (format, M, K, N); the
    records it yields apply only if a compile of a model keys its kernels the same (tiny Llama, FP6)."""
    from tensorpress.compiler.api import import_for_compile
    from tensorpress.compiler.pipeline import rewrite_for_target
    from tensorpress.compiler.targets import parse_target
    from tensorpress.compiler.tuning.extract_kernels import lowered_module, template_kernels
    from tensorpress.compiler.tuning.tuning_kit import point_kernels

    target = parse_target("cuda:sm_90a")
    prepared = import_for_compile(ROOT / "examples" / "tiny_llama", target, weights="fp6")
    rewritten = rewrite_for_target(prepared.imported, target, prepared.recipe)
    kernels = template_kernels(lowered_module(rewritten.model.mod, target), target, "tensorcore-weight-gemm")
    assert {k.key["format"]["name"] for k in kernels} == {"dense-fp16", "e3m2"}
    for kernel in kernels:
        key = kernel.key
        (made,) = point_kernels([(key["format"]["name"], key["m"], key["k"])], (key["n"],), "sm_90a")
        assert key_text(made.points[0][1]) == key_text(key)
