"""ONNX decoders exported with past_key_values (the optimum layout, here from torch.onnx): compiled into
prefill/decode over our paged cache with the weights lifted from the graph, they generate what
onnxruntime generates from the same file with its own KV loop."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from decoder_harness import export_onnx_decoder, make_hf_decoder, onnxruntime_greedy  # noqa: E402

import tensorpress  # noqa: E402
from tensorpress.errors import ModelImportError  # noqa: E402

NEW_TOKENS = 16


@pytest.fixture(scope="module", params=["llama", "qwen2", "opt"])
def exported(request, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp(request.param)
    return export_onnx_decoder(make_hf_decoder(request.param, tmp / "hf"), tmp / "onnx")


def test_compiled_onnx_decoder_equals_onnxruntime(exported, tmp_path):
    report = tensorpress.compile(exported, tmp_path / "m.tpk", target="cpu")
    assert report.manifest["kind"] == "decoder"
    assert not list(exported.parent.glob("*.safetensors"))  # the weights can only have come from the graph
    model = tensorpress.runtime.load(report.artifact)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 384, n).tolist() for n in (6, 1, 13)]
    ours = model.generate(prompts, max_new_tokens=NEW_TOKENS, stop_ids=[])
    logits = model.next_token_logits(prompts)
    for prompt, tokens, first in zip(prompts, ours, logits):
        want_tokens, want_first = onnxruntime_greedy(exported, prompt, NEW_TOKENS)
        assert tokens == want_tokens
        np.testing.assert_allclose(first, want_first, rtol=1e-4, atol=1e-4)


def test_fp6_applies_to_an_onnx_decoders_linear_layers(exported, tmp_path):
    report = tensorpress.compile(exported, tmp_path / "m.tpk", target="cpu", weights="fp6")
    formats = {layer["weight"]: layer["stored_format"] for layer in report.manifest["layers"]}
    projections = {name: fmt for name, fmt in formats.items() if "layers." in name}
    assert projections and set(projections.values()) == {"e3m2"}


def test_an_optimum_style_folder_compiles_from_its_onnx_file(exported, tmp_path):
    """A folder with config.json and one cached-decoder .onnx (no safetensors) is taken as that ONNX file."""
    report = tensorpress.compile(exported.parent, tmp_path / "m.tpk", target="cpu")
    assert report.manifest["kind"] == "decoder" and report.manifest["source"].endswith("model.onnx")


def test_an_onnx_decoder_without_its_config_is_refused(exported, tmp_path):
    lonely = tmp_path / "model.onnx"
    lonely.write_bytes(exported.read_bytes())
    with pytest.raises(ModelImportError, match="needs the config.json"):
        tensorpress.compile(lonely, tmp_path / "m.tpk", target="cpu")
    assert not (tmp_path / "m.tpk").exists()


def test_a_config_that_disagrees_with_the_graph_is_refused(exported, tmp_path):
    folder = tmp_path / "wrong"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(exported.read_bytes())
    config = json.loads((exported.parent / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelImportError, match="past_key_values inputs cover layers"):
        tensorpress.compile(folder / "model.onnx", tmp_path / "m.tpk", target="cpu")


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_weights_torch_onnx_deduplicated_into_identities_are_found(arch, tmp_path):
    """Freshly initialised (norms at 1, biases at 0): torch.onnx keeps one copy of equal initializers
    and turns the others into Identity nodes that carry the duplicates' names."""
    import onnx
    import transformers as tf
    from decoder_harness import hf_config

    tf.AutoModelForCausalLM.from_config(hf_config(arch)).save_pretrained(tmp_path / "hf")
    path = export_onnx_decoder(tmp_path / "hf", tmp_path / "onnx")
    assert any(node.op_type == "Identity" for node in onnx.load(str(path)).graph.node)
    report = tensorpress.compile(path, tmp_path / "m.tpk", target="cpu")
    model = tensorpress.runtime.load(report.artifact)
    prompt = [5, 17, 33, 9, 120]
    _, want_first = onnxruntime_greedy(path, prompt, 1)
    np.testing.assert_allclose(model.next_token_logits([prompt])[0], want_first, rtol=1e-4, atol=1e-4)


def test_weights_in_an_external_data_file_are_read(exported, tmp_path):
    """Models over 2 GB keep their initializers in a side file (location / offset / length)."""
    import onnx

    folder = tmp_path / "external"
    folder.mkdir()
    (folder / "config.json").write_bytes((exported.parent / "config.json").read_bytes())
    onnx.save_model(
        onnx.load(str(exported)), str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx_data",
        size_threshold=0,
    )  # fmt: skip
    assert (folder / "model.onnx_data").stat().st_size > (folder / "model.onnx").stat().st_size
    model = tensorpress.runtime.load(tensorpress.compile(folder / "model.onnx", tmp_path / "m.tpk").artifact)
    prompt = [7, 8, 9]
    _, want_first = onnxruntime_greedy(folder / "model.onnx", prompt, 1)
    np.testing.assert_allclose(model.next_token_logits([prompt])[0], want_first, rtol=1e-4, atol=1e-4)
