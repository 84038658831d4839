"""The README's links lead to files in the repository (a clone has nothing beside it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_relative_links_resolve_inside_the_repository():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert "docs/DESIGN.md" in local
    for link in local:
        target = (ROOT / link).resolve()
        assert target.is_relative_to(ROOT) and target.exists(), link
