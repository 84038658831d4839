"""The private folder a compile builds its library in, and the clean-up of those a killed compile left.

A SIGKILL skips every `finally`, so a compile's build folder is named after its process id
(`tensorpress-build-<pid>-*`) and the next compile removes the folders whose process is gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

PREFIX = "tensorpress-build-"


@contextlib.contextmanager
def build_folder() -> Iterator[Path]:
    """A fresh temporary folder for one build, removed on exit (after clearing dead compiles' folders)."""
    remove_orphaned_build_folders(Path(tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX}{os.getpid()}-") as tmp:
        yield Path(tmp)


def remove_orphaned_build_folders(parent: Path) -> list[Path]:
    """Remove the build folders in `parent` whose compile process no longer exists; returns them."""
    removed = []
    for folder in parent.glob(f"{PREFIX}*-*"):
        pid = folder.name[len(PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to clean
        return True
    return True
