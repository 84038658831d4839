"""pyproject.toml installs without setuptools' deprecation banners (the SPDX `license` string, which the
`setuptools>=` floor of [build-system] supports)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_setuptools_reads_the_project_table_without_a_deprecation_warning(monkeypatch):
    setuptools = pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    deprecations = [str(w.message).splitlines()[0] for w in caught if "Deprecat" in w.category.__name__]
    assert deprecations == []
    assert dist.metadata.license_expression == "Apache-2.0"
    floor = re.search(r'^requires = \["setuptools>=(\d+)', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert floor and int(floor.group(1)) >= 77  # the first setuptools with PEP 639 license strings
    assert int(setuptools.__version__.split(".")[0]) >= 77
