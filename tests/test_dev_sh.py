"""./dev.sh says what it is doing while it installs (a line per stage, before each slow step), and
nothing about installing when the install is up to date. Runs a copy of dev.sh against a stand-in
.venv/bin/python that records its calls instead of installing anything."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
echo "called: $*" >&2
"""


def run_demo(folder: Path) -> list[str]:
    result = subprocess.run(["bash", str(folder / "dev.sh"), "demo", "--device", "cpu"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stderr.splitlines()


def test_dev_sh_demo_says_each_install_stage_before_it_runs(tmp_path):
    for name in ("dev.sh", "pyproject.toml", "setup.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    lines = run_demo(tmp_path)
    calls = [i for i, line in enumerate(lines) if line.startswith("called: ")]
    assert [lines[i] for i in calls] == [
        "called: -m pip install -q --upgrade pip",
        "called: -m pip install -q torch==2.13.0",
        "called: -m pip install -q -e .[dev]",
        "called: examples/demo.py --device cpu",
    ]
    for call in calls:  # each slow step is announced on the line before it
        assert lines[call - 1].startswith("dev.sh: "), lines
    assert lines[0].startswith("dev.sh: installing into .venv")
    # installed: a second run goes straight to the demo
    assert run_demo(tmp_path) == ["dev.sh: running examples/demo.py", "called: examples/demo.py --device cpu"]
