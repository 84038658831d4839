"""Package discovery only (everything else is in pyproject.toml).

One distribution, one import package: the design card's top-level folders are subpackages of
`tensorpress` (compiler/ -> tensorpress.compiler, ...). setuptools' package-dir does the mapping,
editable installs included; this file lists every subpackage under the mapped folders so a new
subfolder with an __init__.py needs no edit here.
"""

import os

from setuptools import setup

PACKAGE_DIRS = {
    "tensorpress": "tensorpress",
    "tensorpress.compiler": "compiler",
    "tensorpress.frontend": "frontend",
    "tensorpress.schedules": "schedules",
    "tensorpress.runtime": "runtime",
}


def _packages() -> list[str]:
    found = []
    for package, folder in PACKAGE_DIRS.items():
        for root, _dirs, files in os.walk(folder):
            if "__init__.py" in files:
                rel = os.path.relpath(root, folder)
                found.append(package if rel == "." else package + "." + rel.replace(os.sep, "."))
    return found


setup(packages=_packages(), package_dir=PACKAGE_DIRS)
