"""The calibration text of the MiniLM quality benchmarks (benchmarks/data/calibration_sentences.txt) holds
none of the sentences they evaluate on (benchmarks/fpx_quality_minilm.py SENTENCES), not even inside a
longer line or with other case and spacing: the min cosine it reports is of held-out sentences."""

from __future__ import annotations

import ast
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def evaluation_sentences() -> list[str]:
    """SENTENCES as written in fpx_quality_minilm.py, read without importing it (torch, the model)."""
    tree = ast.parse((BENCHMARKS / "fpx_quality_minilm.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["SENTENCES"]:
            return ast.literal_eval(node.value)
    raise AssertionError("fpx_quality_minilm.py defines no SENTENCES list")


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


def test_no_evaluation_sentence_is_in_the_calibration_text():
    lines = [normalised(line) for line in (BENCHMARKS / "data" / "calibration_sentences.txt").read_text().splitlines()]
    lines = [line for line in lines if line]
    sentences = [normalised(s) for s in evaluation_sentences()]
    assert len(sentences) == 10 and len(lines) >= 48
    leaked = [s for s in sentences if any(s in line for line in lines)]
    assert not leaked, f"evaluation sentences in the calibration text: {leaked}"
    assert len(set(lines)) == len(lines), "a calibration line appears twice"
