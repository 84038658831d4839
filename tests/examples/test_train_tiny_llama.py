"""The demo model that examples/train_tiny_llama.py trained (examples/tiny_llama/): small, loadable by
transformers, and compiled by tensorpress into a model that writes the same, recognisably English, text."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from decoder_harness import compile_decoder, hf_greedy  # noqa: E402

import tensorpress  # noqa: E402

FOLDER = Path(__file__).resolve().parents[2] / "examples" / "tiny_llama"
PROMPT = "Return a new list containing"
# Not from the standard library's docstrings: text the model never saw.
UNSEEN = "This function returns the number of items in the list. If the list is empty, it raises an error."


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    artifact = compile_decoder(FOLDER, tmp_path_factory.mktemp("tiny") / "tiny_llama.tpk")
    return tensorpress.runtime.load(artifact)


def test_the_folder_is_small_and_complete():
    sizes = {p.name: p.stat().st_size for p in FOLDER.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= set(sizes)
    assert sum(sizes.values()) < 10 * 2**20
    assert json.loads((FOLDER / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_compiled_text_generation_equals_transformers(model):
    tokens = model.generate(PROMPT, max_new_tokens=32)
    prompt_ids = model.encode(PROMPT)
    assert prompt_ids[0] == 1  # the tokenizer puts <s> first, as in training
    expected = hf_greedy(FOLDER, [prompt_ids], 32)[0]
    assert tokens == expected[: len(tokens)]
    words = model.decode_text(tokens).lower().split()
    assert len({"the", "a", "is", "of", "to", "string", "return", "if"} & set(words)) >= 3


def test_unseen_english_is_far_more_likely_than_chance(model):
    logprobs = model.token_logprobs(UNSEEN)
    perplexity = math.exp(-float(np.mean(logprobs)))
    vocab = json.loads((FOLDER / "config.json").read_text())["vocab_size"]
    assert perplexity < vocab / 10, perplexity


def test_the_training_script_runs_and_its_model_compiles(tmp_path):
    """examples/train_tiny_llama.py for 3 steps: a complete folder whose compiled model gives the logits
    transformers gives (the script itself, not only its committed output, keeps working)."""
    import subprocess

    script = Path(__file__).resolve().parents[2] / "examples" / "train_tiny_llama.py"
    out = tmp_path / "tiny"
    run = subprocess.run(
        [sys.executable, str(script), "--steps", "3", "--batch", "2", "--out", str(out)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 3 and record["held_out_perplexity"] < 1024  # below a uniform guess over the vocab
    compiled = tensorpress.runtime.load(compile_decoder(out, tmp_path / "tiny.tpk"))
    prompt = compiled.encode(PROMPT)
    assert compiled.generate(prompt, max_new_tokens=8, stop_ids=[]) == hf_greedy(out, [prompt], 8)[0]
