"""torch.export and torch.fx imports of the reference models, compiled for the CPU, match torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_models import build, example_inputs

import tensorpress
from tensorpress.errors import UnsupportedOperatorError


@pytest.mark.parametrize("tracer", ["export", "fx"])
@pytest.mark.parametrize("name", ["mlp", "convnet", "block"])
def test_torch_model_matches_torch(name, tracer, tmp_path):
    module = build(name)
    inputs = example_inputs(name)
    report = tensorpress.compile(module, tmp_path / "m.tpk", example_inputs=inputs, tracer=tracer)
    model = tensorpress.runtime.load(report.artifact)
    (got,) = model.run([inputs[0].numpy()])
    with torch.no_grad():
        want = module(*inputs).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_weights_keep_their_state_dict_names(tmp_path):
    report = tensorpress.compile(build("block"), tmp_path / "b.tpk", example_inputs=example_inputs("block"))
    names = {layer["weight"] for layer in report.manifest["layers"]}
    assert names == {"qkv.weight", "proj.weight", "fc1.weight", "fc2.weight"}
    assert set(report.manifest["functions"]["main"]["params"]) >= {"ln1.weight", "qkv.bias", "fc2.weight"}


def test_dlpack_torch_tensor_is_accepted(tmp_path):
    module = build("mlp")
    x = example_inputs("mlp")[0]
    report = tensorpress.compile(module, tmp_path / "m.tpk", example_inputs=(x,))
    (got,) = tensorpress.runtime.load(report.artifact).run([x])  # a torch tensor, through DLPack
    np.testing.assert_allclose(got, module(x).detach().numpy(), rtol=1e-4, atol=1e-4)


class _UsesZeta(torch.nn.Module):
    def forward(self, x):
        return torch.special.zeta(x, x) + 1


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_unsupported_torch_operator_names_op_and_source_line(tracer, tmp_path):
    with pytest.raises(UnsupportedOperatorError, match=r"operator '(special_zeta|zeta)[^']*' \(node") as err:
        tensorpress.compile(_UsesZeta(), tmp_path / "z.tpk", example_inputs=(torch.rand(3),), tracer=tracer)
    if tracer == "export":
        assert "test_torch_importer.py" in str(err.value)
    assert not (tmp_path / "z.tpk").exists()


def test_dtype_float16_casts_the_module_before_export(tmp_path):
    module = build("mlp")
    x = example_inputs("mlp")[0]
    report = tensorpress.compile(module, tmp_path / "m.tpk", example_inputs=(x,), dtype="float16")
    model = tensorpress.runtime.load(report.artifact)
    assert model.signature.inputs[0].dtype == "float16"
    (got,) = model.run([x.half().numpy()])
    assert got.dtype == np.float16
    want = module(x).detach().numpy()
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-2, atol=2e-2)
