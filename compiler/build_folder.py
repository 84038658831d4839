"""The private folder a compile builds its library in, and the clean-up of those a killed compile left.

A SIGKILL skips every `finally`, so a compile's build folder is named after its process id
(`tensorpress-build-<pid>-*`), holds a lock for as long as the build runs, and the next compile
removes the folders whose process is gone and whose lock nobody holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

PREFIX = "tensorpress-build-"


LOCK_FILE = ".in-use"


@contextlib.contextmanager
def build_folder() -> Iterator[Path]:
    """A fresh temporary folder for one build, removed on exit (after clearing dead compiles' folders).

    The folder holds a lock file, locked (flock) for the build's lifetime: another compile removes the
    folder only when its process is gone *and* nobody holds that lock (a pid alone can mislead: a
    compile in another PID namespace or on another host sharing the folder looks dead)."""
    remove_orphaned_build_folders(Path(tempfile.gettempdir()))
    with (
        tempfile.TemporaryDirectory(prefix=f"{PREFIX}{os.getpid()}-") as tmp,
        open(Path(tmp) / LOCK_FILE, "w") as lock,
    ):
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield Path(tmp)


def remove_orphaned_build_folders(parent: Path) -> list[Path]:
    """Remove the build folders in `parent` whose compile process no longer exists; returns them."""
    removed = []
    for folder in parent.glob(f"{PREFIX}*-*"):
        pid = folder.name[len(PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)) or _locked(folder / LOCK_FILE):
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


def _locked(lock_path: Path) -> bool:
    """True unless the lock file exists and nobody holds its lock (a folder still being set up has none)."""
    try:
        with open(lock_path) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no lock file (yet, or not ours to open): leave the folder alone
        return True
    return False
