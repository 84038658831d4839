"""Decoders pruned with Wanda, calibrated through their prefill (compiler/calibration/prefill_arguments.py),
compiled for the CPU: next-token logits and greedy tokens equal transformers' on the model pruned the same
way in torch, Wanda's mask computed there from torch's own forward hooks over the same prompts, group by
group (q/k/v, then o, then gate/up, then down, layer after layer), each group's statistics taken with the
groups before it already pruned and stored as fp16 nonzeros, as the sparse formats store them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from decoder_harness import hf_greedy, hf_last_logits, make_hf_decoder

import tensorpress
from tensorpress import SparseConfig
from tensorpress.errors import ConfigError
from tensorpress.runtime.decoder import DecoderModel
from tensorpress.runtime.loaded_artifact import load_artifact

DEMO = Path(__file__).resolve().parents[2] / "examples" / "tiny_llama"
CALIBRATION_TEXT = [
    "Once upon a time there was a little girl who loved to play in the garden.",
    "The dog ran after the red ball and barked at the birds in the tree.",
    "Tom and Lily went to the park to see the big old tree.",
]
PROMPT = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114]


def wanda_groups(layers: int) -> list[list[str]]:
    groups = []
    for i in range(layers):
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        groups += [[attn + "q_proj", attn + "k_proj", attn + "v_proj"], [attn + "o_proj"]]
        groups += [[mlp + "gate_proj", mlp + "up_proj"], [mlp + "down_proj"]]
    return groups


def torch_wanda_pruned(folder: Path, dest: Path, prompts: list[list[int]], sparsity: float) -> Path:
    """`folder`'s model pruned by Wanda in torch (see the module docstring), saved into `dest`."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder).eval()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for group in wanda_groups(model.config.num_hidden_layers):
            sq: dict[str, torch.Tensor] = {}
            hooks = [
                modules[name].register_forward_hook(
                    lambda mod, args, out, name=name: sq.__setitem__(
                        name, sq.get(name, 0) + args[0].double().reshape(-1, mod.in_features).square().sum(0)
                    )
                )
                for name in group
            ]
            for prompt in prompts:
                model(torch.tensor([prompt]))
            for hook in hooks:
                hook.remove()
            for name in group:
                weight = modules[name].weight
                score = weight.abs() * sq[name].sqrt().float()[None, :]
                keep = weight.shape[1] - int(np.floor(sparsity * weight.shape[1]))
                mask = torch.zeros_like(weight, dtype=torch.bool).scatter_(
                    1, torch.topk(score, keep, dim=1).indices, True
                )
                weight.copy_(torch.where(mask, weight, 0.0).half().float())
    model.save_pretrained(dest)
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (folder / extra).is_file():
            shutil.copy(folder / extra, dest / extra)
    return dest


def _check_against_transformers(artifact: Path, reference: Path, groups: list[list[str]]) -> None:
    loaded = load_artifact(artifact, "cpu")
    pruned = {layer["weight"] for layer in loaded.manifest["layers"] if "density" in layer}
    assert pruned == {f"{name}.weight" for group in groups for name in group}
    model = DecoderModel(loaded, max_total_tokens=128)
    logits = model.next_token_logits(PROMPT).reshape(-1)
    want = hf_last_logits(reference, PROMPT)
    np.testing.assert_allclose(logits, want, rtol=1e-3, atol=1e-3)
    assert model.generate(PROMPT, max_new_tokens=12, stop_ids=[]) == hf_greedy(reference, [PROMPT], 12)[0]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A random 2-layer GQA Llama (decoder_harness.hf_config)."""
    return make_hf_decoder("llama", tmp_path_factory.mktemp("llama") / "llama")


def test_random_gqa_llama_wanda_from_npz_prompts_matches_transformers(tmp_path, llama):
    folder = llama
    prompts = np.random.default_rng(1).integers(3, 256, (4, 20))
    np.savez(tmp_path / "calib.npz", input_ids=prompts)
    artifact = tmp_path / "wanda.tpk"
    tensorpress.compile(folder, artifact, sparsity=SparseConfig(0.5, prune="wanda"), calibration=tmp_path / "calib.npz")
    reference = torch_wanda_pruned(folder, tmp_path / "reference", prompts.tolist(), 0.5)
    _check_against_transformers(artifact, reference, wanda_groups(2))
    # and the statistics mattered: magnitude pruning (the same rows, no activations) gives other logits
    assert np.abs(magnitude_pruned_logits(folder, 0.5) - hf_last_logits(reference, PROMPT)).max() > 1e-2


def magnitude_pruned_logits(folder: Path, sparsity: float) -> np.ndarray:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        for name in (f"{n}.weight" for group in wanda_groups(model.config.num_hidden_layers) for n in group):
            weight = model.get_parameter(name)
            keep = weight.shape[1] - int(np.floor(sparsity * weight.shape[1]))
            top = torch.topk(weight.abs(), keep, dim=1).indices
            weight.copy_(torch.where(torch.zeros_like(weight, dtype=torch.bool).scatter_(1, top, True), weight, 0.0))
        return model(torch.tensor([PROMPT])).logits[0, -1].numpy()


@pytest.mark.slow
def test_demo_llama_wanda_from_text_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    (tmp_path / "calib.txt").write_text("\n".join(CALIBRATION_TEXT) + "\n")
    artifact = tmp_path / "wanda.tpk"
    tensorpress.compile(DEMO, artifact, sparsity=SparseConfig(0.5, prune="wanda"), calibration=tmp_path / "calib.txt")
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO))
    prompts = [tokenizer(line)["input_ids"] for line in CALIBRATION_TEXT]
    reference = torch_wanda_pruned(DEMO, tmp_path / "reference", prompts, 0.5)
    _check_against_transformers(artifact, reference, wanda_groups(4))


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"input_ids": np.zeros((2, 3), np.int64), "x": np.zeros(3)}, "must hold one integer array, input_ids"),
        ({"input_ids": np.zeros((2, 3), np.float32)}, "must hold one integer array, input_ids"),
        ({"input_ids": np.full(4, 5000)}, r"holds token ids 5000..5000; the vocabulary's ids are 0..383"),
        ({"input_ids": np.zeros((2, 0), np.int32)}, r"has 0 tokens; a prompt needs 1 to \d+ \(the context length\)"),
    ],
)
def test_bad_decoder_calibration_prompts_are_one_sentence(tmp_path, llama, arrays, message):
    np.savez(tmp_path / "calib.npz", **arrays)
    with pytest.raises(ConfigError, match=message):
        tensorpress.compile(
            llama, tmp_path / "m.tpk", sparsity=SparseConfig(0.5, prune="wanda"), calibration=tmp_path / "calib.npz"
        )
    assert not (tmp_path / "m.tpk").exists()
