"""Data flows one way (docs/DESIGN.md), and so do imports: no room imports one it must not know about.
Every `import` of every source file is read, lazy ones inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# room (folder) -> the tensorpress subpackages its files may never import
FORBIDDEN = {
    "frontend": ("tensorpress.compiler", "tensorpress.schedules"),  # it only says where attention and the cache live
    "schedules": ("tensorpress.compiler", "tensorpress.frontend", "tensorpress.runtime"),
    "runtime": ("tensorpress.compiler", "tensorpress.frontend", "tensorpress.schedules"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, `from a import b` counted as a.b as well as a."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_room_imports_nothing_it_must_not(room):
    bad = []
    for path in sorted((ROOT / room).rglob("*.py")):
        for line, module in imported_modules(path):
            if module.startswith(FORBIDDEN[room]):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_the_scan_sees_lazy_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from tensorpress.compiler.formats import fpx\n")
    assert (2, "tensorpress.compiler.formats.fpx") in imported_modules(source)
