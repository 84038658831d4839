"""A compiled decoder carries its tokenizer: text prompts work after the source folder is gone."""

from __future__ import annotations

import shutil
from pathlib import Path

import tensorpress

FOLDER = Path(__file__).resolve().parents[2] / "examples" / "tiny_llama"


def test_text_generation_without_the_source_folder(tmp_path):
    source = tmp_path / "tiny_llama"
    shutil.copytree(FOLDER, source)
    report = tensorpress.compile(source, tmp_path / "tiny.tpk", weights="fp6")
    shutil.rmtree(source)
    model = tensorpress.runtime.load(report.artifact, max_total_tokens=256)
    tokens = model.generate("Return a new list containing", max_new_tokens=8)
    assert len(tokens) == 8
    assert model.decode_text(tokens).strip()
    assert model.encode("Return a new list containing")[0] == 1
