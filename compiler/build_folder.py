"""Private working folders (the one a compile builds its library in, the one `package` stages a bundle
in), and the clean-up of those a killed process left.

A SIGKILL skips every `finally`, so such a folder is named after its process id (`<prefix><pid>-*`,
e.g. `tensorpress-build-<pid>-*`), holds a lock for as long as it is in use, and the next process
making one with that prefix removes the folders whose process is gone and whose lock nobody holds.
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
    """A fresh temporary folder for one build, removed on exit (after clearing dead compiles' folders)."""
    with owned_folder(Path(tempfile.gettempdir()), PREFIX) as folder:
        yield folder


@contextlib.contextmanager
def owned_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A new folder `<prefix><pid>-XXXXXXXX` in `parent` (after removing the orphans of that prefix there),
    removed on exit unless the block renamed it away (then first unlink its LOCK_FILE: the lock holds
    through the open file).

    The folder holds a lock file, locked (flock) for the block's lifetime: another process removes the
    folder only when its owner is gone *and* nobody holds that lock (a pid alone can mislead: a process
    in another PID namespace or on another host sharing the folder looks dead)."""
    remove_orphaned_build_folders(parent, prefix)
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    try:
        with open(folder / LOCK_FILE, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_orphaned_build_folders(parent: Path, prefix: str = PREFIX) -> list[Path]:
    """Remove the folders `<prefix><pid>-*` in `parent` whose process no longer exists and whose lock
    nobody holds; returns them."""
    removed = []
    for folder in parent.glob(f"{prefix}*-*"):
        pid = folder.name[len(prefix) :].split("-", 1)[0]
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
