"""Files that appear whole or not at all.

`atomic_output(path)` builds the file in an unnamed temporary file in the destination folder (Linux
O_TMPFILE: if the process is killed, there is nothing to clean up) and links it into place only when
complete; where O_TMPFILE is unavailable, a hidden temporary name is used and removed on any error.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Any]:
    """Yield a writable binary file; on success it becomes `path`, on any error nothing is left."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd = None
    if hasattr(os, "O_TMPFILE"):
        with contextlib.suppress(OSError):
            fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o644)
    if fd is not None:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N gives the unnamed file a name; os.link only
            # calls linkat (rather than link) when a dir_fd is given. A new destination gets its name
            # directly (nothing can be left over); an existing one is replaced through a temporary
            # name and a rename, both atomic.
            proc_fd = os.open("/proc/self/fd", os.O_RDONLY)
            try:
                try:
                    os.link(str(f.fileno()), path, src_dir_fd=proc_fd, follow_symlinks=True)
                    return
                except FileExistsError:
                    pass
                tmp_name = folder / f".{path.name}.{os.getpid()}.tmp"
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_name)
                os.link(str(f.fileno()), tmp_name, src_dir_fd=proc_fd, follow_symlinks=True)
            finally:
                os.close(proc_fd)
        os.replace(tmp_name, path)
        return
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
