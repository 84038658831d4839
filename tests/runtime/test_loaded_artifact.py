"""Weights given at load time: an artifact compiled with store_weights=False records names, shapes and
dtypes only (a Hugging Face decoder folder may then hold config.json alone); `load(..., weights=...)`
supplies the values, or replaces stored ones, and a dict that does not fit is refused in one sentence."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from decoder_harness import make_hf_decoder

import tensorpress
from tensorpress.errors import ArtifactError, InputError
from tensorpress.runtime.artifact import WEIGHTS, open_artifact
from tensorpress.runtime.loaded_artifact import weight_specs

PROMPTS = [[5, 9, 13, 2, 7], [100, 3]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random Llama compiled twice for the CPU: weights stored, and shapes only (from config.json
    alone); the stored artifact's weights and its greedy continuations."""
    tmp = tmp_path_factory.mktemp("weights_at_load")
    folder = make_hf_decoder("llama", tmp / "llama")
    config_only = tmp / "config_only"
    config_only.mkdir()
    shutil.copy(folder / "config.json", config_only / "config.json")
    stored = tmp / "stored.tpk"
    shapes_only = tmp / "shapes_only.tpk"
    tensorpress.compile(folder, stored, target="cpu")
    tensorpress.compile(config_only, shapes_only, target="cpu", store_weights=False)
    weights = {name: np.array(a) for name, a in open_artifact(stored).weights().items()}
    reference = tensorpress.runtime.load(stored).generate(PROMPTS, max_new_tokens=8, stop_ids=[])
    return stored, shapes_only, weights, reference


def test_a_shapes_only_artifact_records_every_weight_but_no_values(llama):
    stored, shapes_only, weights, _ = llama
    opened = open_artifact(shapes_only)
    assert opened.manifest["weights"]["stored"] is False
    assert open_artifact(stored).manifest["weights"]["stored"] is True
    assert weight_specs(opened) == weight_specs(open_artifact(stored))
    assert weight_specs(opened) == {name: (a.shape, a.dtype.name) for name, a in weights.items()}
    header_only = opened.offsets[WEIGHTS][1]
    assert header_only < 16 << 10 < sum(a.nbytes for a in weights.values())


def test_weights_given_at_load_time_generate_what_the_stored_ones_do(llama):
    _, shapes_only, weights, reference = llama
    model = tensorpress.runtime.load(shapes_only, weights=weights)
    assert model.generate(PROMPTS, max_new_tokens=8, stop_ids=[]) == reference


def test_a_shapes_only_artifact_without_weights_is_refused(llama):
    _, shapes_only, _, _ = llama
    with pytest.raises(ArtifactError, match="store_weights=False.*weights="):
        tensorpress.runtime.load(shapes_only)


def test_given_weights_replace_stored_ones(llama):
    stored, _, weights, _ = llama
    silent_head = dict(weights, **{"lm_head.weight": np.zeros_like(weights["lm_head.weight"])})
    logits = tensorpress.runtime.load(stored, weights=silent_head).next_token_logits(PROMPTS)
    assert logits.shape[0] == 2 and not logits.any()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: w.pop("lm_head.weight"), r"missing \['lm_head.weight'\]"),
        (lambda w: w.update(extra=np.zeros(3, np.float32)), r"unknown \['extra'\]"),
        (lambda w: w.update({"lm_head.weight": w["lm_head.weight"][:-1]}), r"lm_head.weight is float32 \[\d.* needs"),
        (lambda w: w.update({"lm_head.weight": w["lm_head.weight"].astype(np.float64)}), "is float64"),
    ],
)
def test_a_weight_dict_that_does_not_fit_is_refused_in_one_sentence(llama, change, message):
    _, shapes_only, weights, _ = llama
    wrong = dict(weights)
    change(wrong)
    with pytest.raises(InputError, match=message) as err:
        tensorpress.runtime.load(shapes_only, weights=wrong)
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")


def test_weights_may_be_dlpack_tensors_used_in_place(llama):
    torch = pytest.importorskip("torch")
    _, shapes_only, weights, reference = llama
    tensors = {name: torch.tensor(a) for name, a in weights.items()}  # torch's allocator: 64-byte aligned
    model = tensorpress.runtime.load(shapes_only, weights=tensors)
    assert model.generate(PROMPTS, max_new_tokens=8, stop_ids=[]) == reference
    wrong = dict(tensors, **{"lm_head.weight": tensors["lm_head.weight"].double()})
    with pytest.raises(InputError, match="lm_head.weight is float64"):
        tensorpress.runtime.load(shapes_only, weights=wrong)
