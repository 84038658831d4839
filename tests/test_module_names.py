"""Test modules have unique file names: the test folders are not packages, so pytest imports each test
file under its bare name, and a second file of the same name fails collection ("import file mismatch")
only when both are collected in one run, which the full suite does and a run of one folder does not."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_two_test_modules_share_a_name():
    places = defaultdict(list)
    for path in TESTS.rglob("test_*.py"):
        places[path.name].append(str(path.relative_to(TESTS)))
    shared = {name: sorted(paths) for name, paths in places.items() if len(paths) > 1}
    assert not shared, f"test modules sharing a name (rename one of each): {shared}"
