"""The calibration path (compiler/calibration/): the statistics it collects by running the compiled
Relax module equal torch's forward hooks on every linear layer (torch and ONNX frontends alike); the
file layout (.npz: one sample or [samples, ...]); and each bad calibration input is one sentence,
with nothing written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_models import build, export_onnx

import tensorpress
from tensorpress import SparseConfig
from tensorpress.compiler.calibration import (
    calibration_feeds,
    expose_linear_inputs,
    linear_input_statistics,
    read_calibration_file,
)
from tensorpress.compiler.passes.rewrite_linear_to_weight_gemm import find_linear_sites
from tensorpress.errors import ConfigError
from tensorpress.frontend import import_model


def torch_linear_inputs(model: torch.nn.Module, samples: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """{weight name: every input row any call of that nn.Linear saw, float64 [tokens, K]} by forward hooks."""
    seen: dict[str, list[np.ndarray]] = {}
    hooks = [
        module.register_forward_hook(
            lambda mod, args, out, name=name: seen.setdefault(f"{name}.weight", []).append(
                args[0].detach().reshape(-1, mod.in_features).double().numpy()
            )
        )
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    with torch.no_grad():
        for x in samples:
            model(x)
    for hook in hooks:
        hook.remove()
    return {name: np.concatenate(rows) for name, rows in seen.items()}


@pytest.mark.parametrize("frontend", ["torch", "onnx"])
def test_statistics_equal_torch_forward_hooks(tmp_path, frontend):
    model = build("block")
    rng = np.random.default_rng(0)
    samples = rng.standard_normal((3, 2, 16, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=samples)
    if frontend == "torch":
        imported = import_model(model, example_inputs=(torch.from_numpy(samples[0]),))
        np.savez(tmp_path / "calib.npz", **{imported.inputs[0].name: samples})
    else:  # the ONNX graph names its MatMul weights itself: in the order of the layers
        imported = import_model(export_onnx("block", tmp_path))
    feeds = calibration_feeds(read_calibration_file(tmp_path / "calib.npz"), imported)
    assert len(feeds) == 3
    sites = find_linear_sites(imported.mod)
    torch_names = dict(zip([s.weight for s in sites], ["qkv.weight", "proj.weight", "fc1.weight", "fc2.weight"]))
    stats = linear_input_statistics(imported, feeds, {s.weight: s.k for s in sites})
    want = torch_linear_inputs(model, [torch.from_numpy(s) for s in samples])
    levels = expose_linear_inputs(imported.mod, list(torch_names))[2]
    assert {torch_names[name]: level for name, level in levels.items()} == {
        "qkv.weight": 1, "proj.weight": 2, "fc1.weight": 3, "fc2.weight": 4
    }  # fmt: skip
    for name, torch_name in torch_names.items():
        x = want[torch_name]
        assert stats[name].tokens == x.shape[0] == 3 * 2 * 16
        np.testing.assert_allclose(stats[name].gram, x.T @ x, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(stats[name].channel_norms, np.linalg.norm(x, axis=0), rtol=1e-5)


class SharedWeight(torch.nn.Module):
    """One nn.Linear called twice on different inputs: its statistics hold both calls' tokens."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(32, 32)
        self.out = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.out(self.inner(x) + self.inner(torch.relu(x) * 3.0))


def test_a_weight_read_by_two_linears_sums_both_inputs_and_one_sample_layout(tmp_path):
    torch.manual_seed(0)
    model = SharedWeight().eval()
    x = torch.randn(4, 32)
    imported = import_model(model, example_inputs=(x,))
    name = imported.inputs[0].name
    np.savez(tmp_path / "one.npz", **{name: x.numpy()})  # one sample: shaped like the input itself
    (feed,) = calibration_feeds(read_calibration_file(tmp_path / "one.npz"), imported)
    stats = linear_input_statistics(imported, [feed], {"inner.weight": 32})["inner.weight"]
    want = torch_linear_inputs(model, [x])["inner.weight"]
    assert stats.tokens == want.shape[0] == 8
    np.testing.assert_allclose(stats.gram, want.T @ want, rtol=1e-5, atol=1e-4)


class SeparateProjections(torch.nn.Module):
    """Query, key and value as three nn.Linear reading one input (BERT's, Llama's layout)."""

    def __init__(self):
        super().__init__()
        self.q, self.k = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
        self.v = torch.nn.Linear(64, 64, bias=False)

    def forward(self, x):
        return torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1) @ self.v(x)


def test_linears_reading_one_input_each_count_it_once(tmp_path):
    """The pattern matcher handed the key's and value's input back twice (MiniLM's key and value
    statistics held every token twice); each weight's statistics are its one input's."""
    torch.manual_seed(0)
    model = SeparateProjections().eval()
    x = torch.randn(2, 16, 64)
    imported = import_model(model, example_inputs=(x,))
    feed = {imported.inputs[0].name: x.numpy()}
    stats = linear_input_statistics(imported, [feed], {f"{p}.weight": 64 for p in "qkv"})
    want = torch_linear_inputs(model, [x])
    for name, got in stats.items():
        assert got.tokens == want[name].shape[0] == 32, name
        np.testing.assert_allclose(got.gram, want[name].T @ want[name], rtol=1e-5, atol=1e-4)


def _mlp_and_input():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval()
    return model, torch.randn(5, 64)


def _bad_files(tmp_path):
    x = np.zeros((5, 64), np.float32)
    np.savez(tmp_path / "missing_input.npz", y=x)
    np.savez(tmp_path / "extra.npz", input=x, y=x)
    np.savez(tmp_path / "dtype.npz", input=x.astype(np.float64))
    np.savez(tmp_path / "shape.npz", input=np.zeros((2, 5, 63), np.float32))
    np.savez(tmp_path / "rank.npz", input=np.zeros((1, 2, 5, 64), np.float32))
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "text.txt").write_text("a sentence\n")
    (tmp_path / "calib.csv").write_text("1,2\n")
    return [
        ("missing_input.npz", "lacks the model's input"),
        ("extra.npz", "holds y; it must hold exactly the model's inputs by name: input"),
        ("dtype.npz", "is float64; the model's input is float32"),
        ("shape.npz", r"has shape \[5, 63\]; the model's input is float32 \[5, 64\]"),
        ("rank.npz", "has rank 4"),
        ("garbage.npz", "cannot read calibration file"),
        ("nothing.npz", "does not exist"),
        ("empty.txt", "holds no text"),
        ("text.txt", "needs a model with a tokenizer"),
        ("calib.csv", r"must be an \.npz of model inputs or a \.txt"),
    ]


def test_bad_calibration_is_one_sentence_and_writes_nothing(tmp_path):
    model, x = _mlp_and_input()
    out = tmp_path / "m.tpk"
    for file, message in _bad_files(tmp_path):
        with pytest.raises(ConfigError, match=message) as err:
            tensorpress.compile(
                model, out, example_inputs=(x,), sparsity=SparseConfig(0.5, prune="wanda"), calibration=tmp_path / file
            )
        assert str(err.value).count(". ") == 0 and "\n" not in str(err.value), err.value
    cases = [
        (dict(sparsity=SparseConfig(0.5, prune="wanda")), "wanda needs calibration data; give --calibration"),
        (dict(sparsity=SparseConfig(0.5, prune="sparsegpt")), "sparsegpt needs calibration data"),
        (dict(weights="fp6", scale_search="act"), "act scale search needs calibration data"),
        (dict(weights="int8", scale_search="act", calibration=tmp_path / "extra.npz"), "act .* applies to FPx"),
        (dict(sparsity=SparseConfig(0.5), calibration=tmp_path / "extra.npz"), "read only by --prune wanda"),
        (dict(sparsity=SparseConfig(0.5, prune="wanda"), calibration=tmp_path / "extra.npz", store_weights=False),
         "store_weights=False"),
    ]  # fmt: skip
    for options, message in cases:
        with pytest.raises(ConfigError, match=message):
            tensorpress.compile(model, out, example_inputs=(x,), **options)
    assert not out.exists()
