"""The runtime's GraphModel: inputs checked by name, shape and dtype; the runtime stays light."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from reference_models import export_onnx

import tensorpress
from tensorpress.compiler.targets import CUDA_ARCHS
from tensorpress.errors import ArtifactError, DeviceMismatchError, InputError
from tensorpress.runtime import tvm_runtime
from tensorpress.runtime.artifact import open_artifact
from tensorpress.runtime.inspect_artifact import describe_artifact
from tensorpress.runtime.loaded_artifact import BUILDABLE_CUDA_ARCHS, check_device_fits, cuda_arch_runs_on


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlp")
    onnx_path = export_onnx("mlp", folder)
    return onnx_path, tensorpress.compile(onnx_path, folder / "mlp.tpk").artifact


@pytest.fixture(scope="module")
def cuda_mlps(mlp, tmp_path_factory):
    """The MLP built for the GPU (nvcc, no GPU needed): {arch: artifact} for sm_80 and sm_90a."""
    folder = tmp_path_factory.mktemp("cuda_mlp")
    return {
        arch: tensorpress.compile(mlp[0], folder / f"mlp_{arch}.tpk", target=f"cuda:{arch}").artifact
        for arch in ("sm_80", "sm_90a")
    }


def fake_gpu(monkeypatch, compute_version: str | None) -> None:
    """Make the runtime see one CUDA device of this compute capability ("8.0"), or none (None)."""
    info = {"exists": False} if compute_version is None else {"exists": True, "compute_version": compute_version}
    monkeypatch.setattr(
        tvm_runtime, "cuda_device_info", lambda index=0: dict(info) if index == 0 else {"exists": False}
    )


def test_signature_names_shapes_and_dtypes(mlp):
    model = tensorpress.runtime.load(mlp[1])
    assert str(model.signature) == "(x: float32[batch, 64]) -> (y: float32[batch, 32])"


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"z": np.zeros((2, 64), np.float32)}, "no input named 'z'; its inputs are x"),
        ({}, "input 'x' is missing"),
        ({"x": np.zeros((2, 63), np.float32)}, r"input 'x' must have size 64 on axis 1"),
        ({"x": np.zeros((2, 64), np.float64)}, "input 'x' must be float32, got float64"),
        ({"x": np.zeros((64,), np.float32)}, "must have 2 dimensions"),
        ([np.zeros((2, 64), np.float32)] * 2, "takes 1 inputs"),
    ],
)
def test_wrong_inputs_are_refused_in_one_sentence(mlp, inputs, message):
    model = tensorpress.runtime.load(mlp[1])
    with pytest.raises(InputError, match=message):
        model.run(inputs)


def test_runs_many_batch_sizes(mlp):
    import onnxruntime as ort

    model = tensorpress.runtime.load(mlp[1])
    session = ort.InferenceSession(str(mlp[0]))
    for batch in (1, 3, 17):
        x = np.random.default_rng(batch).standard_normal((batch, 64)).astype(np.float32)
        np.testing.assert_allclose(model.run([x])[0], session.run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_cuda_binary_compatibility_rule():
    assert cuda_arch_runs_on("sm_80", "sm_86")
    assert not cuda_arch_runs_on("sm_80", "sm_90")  # SASS does not cross major versions
    assert cuda_arch_runs_on("sm_90a", "sm_90")
    assert not cuda_arch_runs_on("sm_90a", "sm_100")
    assert not cuda_arch_runs_on("sm_86", "sm_80")


def test_artifact_for_another_device_kind_is_refused(mlp, tmp_path):
    manifest = {"target": {"kind": "cuda", "arch": "sm_90a"}}
    with pytest.raises(DeviceMismatchError, match="built for cuda, not cpu; load it with device='cuda:0'"):
        check_device_fits(manifest, "cpu", 0, tmp_path / "x.tpk")
    with pytest.raises(DeviceMismatchError, match="built for cpu, not cuda"):
        check_device_fits({"target": {"kind": "cpu", "arch": None}}, "cuda", 0, tmp_path / "x.tpk")


@pytest.mark.parametrize(
    "arch, device, advice",
    [
        ("sm_90a", "8.0", "recompile it with --target cuda:sm_80."),  # Hopper-only kernels on an A100
        ("sm_80", "9.0", "recompile it with --target cuda:sm_90a."),  # SASS only, no PTX the driver could JIT
    ],
)
def test_artifact_for_another_gpu_arch_is_refused_on_load(cuda_mlps, monkeypatch, arch, device, advice):
    fake_gpu(monkeypatch, device)
    have = "sm_" + device.replace(".", "")
    with pytest.raises(DeviceMismatchError) as err:
        tensorpress.runtime.load(cuda_mlps[arch], device="cuda:0")
    message = str(err.value)
    assert f"built for {arch}, but cuda:0 is {have}; {advice}" in message
    assert message.count(". ") == 0 and message.endswith(".")


@pytest.mark.parametrize("arch, device", [("sm_80", "8.0"), ("sm_80", "8.6"), ("sm_80", "8.9"), ("sm_90a", "9.0")])
def test_artifact_for_a_compatible_gpu_passes_the_device_check(cuda_mlps, monkeypatch, arch, device):
    fake_gpu(monkeypatch, device)
    manifest = open_artifact(cuda_mlps[arch]).manifest
    check_device_fits(manifest, "cuda", 0, cuda_mlps[arch])  # no exception


@pytest.mark.parametrize("device, too", [("7.5", "older"), ("10.0", "newer"), ("12.0", "newer")])
def test_a_gpu_tensorpress_cannot_build_for_is_named_not_suggested(cuda_mlps, monkeypatch, device, too):
    """The advice never names a target `tensorpress compile` would refuse."""
    fake_gpu(monkeypatch, device)
    have = "sm_" + device.replace(".", "")
    with pytest.raises(DeviceMismatchError) as err:
        tensorpress.runtime.load(cuda_mlps["sm_80"], device="cuda:0")
    message = str(err.value)
    assert f"cuda:0 is {have}, which tensorpress cannot build for" in message
    assert "--target cuda:" not in message and "--target cpu" in message
    assert message.count(". ") == 0 and message.endswith(".")


def test_a_cuda_artifact_without_a_cuda_device_says_to_recompile_for_the_cpu(cuda_mlps, monkeypatch):
    fake_gpu(monkeypatch, None)
    with pytest.raises(
        DeviceMismatchError, match=r"for a CUDA GPU \(sm_90a\), but this machine has no device cuda:1; "
    ):
        tensorpress.runtime.load(cuda_mlps["sm_90a"], device="cuda:1")

    def no_driver(index=0):
        raise DeviceMismatchError("no NVIDIA driver (libcuda.so.1) on this machine; use device='cpu'.")

    monkeypatch.setattr(tvm_runtime, "cuda_device_info", no_driver)
    with pytest.raises(DeviceMismatchError) as err:
        tensorpress.runtime.load(cuda_mlps["sm_90a"], device="cuda:0")
    assert "this machine has no NVIDIA driver (libcuda.so.1)" in str(err.value)
    assert str(err.value).endswith("or recompile it with --target cpu.")  # not "use device='cpu'": it is a GPU build


def test_the_runtime_knows_the_archs_the_compiler_builds_for():
    """A copy (the runtime may not import the compiler): this test keeps the two lists equal."""
    assert BUILDABLE_CUDA_ARCHS == CUDA_ARCHS


def test_runtime_imports_neither_torch_nor_the_compiler(mlp):
    """In a fresh process: load + run with the runtime alone, then look at what got loaded."""
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        import tensorpress.runtime
        model = tensorpress.runtime.load({str(mlp[1])!r})
        y = model.run([np.ones((2, 64), np.float32)])[0]
        maps = open("/proc/self/maps").read()
        print(json.dumps({{
            "shape": list(y.shape),
            "torch": "torch" in sys.modules,
            "tvm": "tvm" in sys.modules,
            "compiler_pkg": any(m.startswith("tensorpress.compiler") for m in sys.modules),
            "libtvm_compiler": "libtvm_compiler" in maps,
            "libtvm_runtime": "libtvm_runtime.so" in maps,
        }}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts == {
        "shape": [2, 32],
        "torch": False,
        "tvm": False,
        "compiler_pkg": False,
        "libtvm_compiler": False,
        "libtvm_runtime": True,
    }


def _manifest_without(key_path):
    def change(manifest):
        *parents, last = key_path
        node = manifest
        for key in parents:
            node = node[key]
        node[last] = "nonsense" if last != "kind" else "ensemble"
        return manifest

    return change


@pytest.mark.parametrize(
    "key_path, message",
    [
        (["kind"], "names an unknown model kind 'ensemble'"),
        (["target"], "has no valid target"),
        (["target", "kind"], "has no valid target"),
        (["functions"], "has no valid functions table"),
        (["inputs"], "has no valid inputs"),
        (["cpu_flags"], "has cpu_flags that are not a list"),
    ],
)
def test_a_crafted_manifest_is_refused_before_loading(mlp, tmp_path, key_path, message):
    from test_artifact import _rewrite_manifest

    crafted = tmp_path / "crafted.tpk"
    crafted.write_bytes(mlp[1].read_bytes())
    _rewrite_manifest(crafted, _manifest_without(key_path))
    with pytest.raises(ArtifactError, match=message) as err:
        tensorpress.runtime.load(crafted)
    assert "\n" not in str(err.value) and "recompile" in str(err.value)
    with pytest.raises(ArtifactError, match=message):  # `tensorpress inspect` too, not a KeyError
        describe_artifact(crafted)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("dir", "is a directory"),
        (b"garbage bytes, not numpy", "is not an .npz file"),
        ("npy", "is not an .npz file"),
        ("objects", "holds an array of Python objects"),
    ],
)
def test_run_reads_inputs_with_one_sentence_for_a_bad_file(mlp, tmp_path, capsys, content, message):
    from tensorpress.cli import main

    inputs = tmp_path / "in.npz"
    if content == "dir":
        inputs.mkdir()
    elif content == "npy":
        np.save(tmp_path / "in.npy", np.zeros(3))
        (tmp_path / "in.npy").rename(inputs)
    elif content == "objects":
        np.savez(inputs, x=np.array([{"a": 1}], dtype=object))
    elif content is not None:
        inputs.write_bytes(content)
    assert main(["run", str(mlp[1]), "--inputs", str(inputs), "--output", str(tmp_path / "out.npz")]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "allow_pickle" not in err
    assert not (tmp_path / "out.npz").exists()


def test_run_on_a_directory_says_it_is_a_directory(tmp_path, capsys):
    from tensorpress.cli import main

    np.savez(tmp_path / "in.npz", x=np.zeros((1, 64), np.float32))
    assert main(["run", str(tmp_path), "--inputs", str(tmp_path / "in.npz"), "--output", str(tmp_path / "o.npz")]) == 1
    assert "is a directory, not an artifact" in capsys.readouterr().err
