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
from tensorpress.errors import DeviceMismatchError, InputError
from tensorpress.runtime.loaded_artifact import check_device_fits, cuda_arch_runs_on


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlp")
    onnx_path = export_onnx("mlp", folder)
    return onnx_path, tensorpress.compile(onnx_path, folder / "mlp.tpk").artifact


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
