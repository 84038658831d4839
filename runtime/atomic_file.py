"""Files that appear whole or not at all.

`atomic_output(path)` builds the file in an unnamed temporary file in the destination folder (Linux
O_TMPFILE: if the process is killed, there is nothing to clean up) and links it into place only when
complete; where O_TMPFILE is unavailable, a hidden temporary name is used and removed on any error.
`check_destination(path)` refuses, in one sentence and before any work, a destination that cannot be
written: a directory, a folder that is a file, a folder this process may not write to.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tensorpress.errors import ConfigError


def check_destination(path: str | os.PathLike, what: str = "output file", example: str | None = None) -> Path:
    """Raise ConfigError unless a file can be written at `path` (missing folders on the way count as
    creatable, but are not created); `what` names it in the message, `example` is a file name to suggest
    when `path` is a directory. Writes nothing: the probe is an unnamed temporary file."""
    path = Path(path)
    if path.is_dir():
        suggestion = f", e.g. {path / example}" if example else ""
        raise ConfigError(f"{path} is a directory; give the {what} a file name{suggestion}.")
    folder = path.parent if str(path.parent) else Path(".")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot write {path}: {existing} is a file, not a folder; choose another {what}.")
    try:
        _probe(existing)
    except OSError as err:
        reason = err.strerror.lower() if err.strerror else type(err).__name__
        raise ConfigError(
            f"cannot write {path}: folder {existing} is not writable ({reason}); choose another {what}."
        ) from err
    return path


def _probe(folder: Path) -> None:
    """Create a file in `folder` and remove it (an unnamed one where O_TMPFILE works); raise OSError if
    that is not allowed."""
    if hasattr(os, "O_TMPFILE"):
        try:
            os.close(os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o600))
            return
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            # a file system without O_TMPFILE: try with a name
    handle, name = tempfile.mkstemp(dir=folder, prefix=".tensorpress-probe-")
    os.close(handle)
    os.unlink(name)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Any]:
    """Yield a writable binary file; on success it becomes `path`, on any error nothing is left (not
    even a temporary name) and `path` is what it was before."""
    path = check_destination(path)
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
            _link_into_place(f.fileno(), path, folder)
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


def _link_into_place(fileno: int, path: Path, folder: Path) -> None:
    """Give the unnamed file open as `fileno` the name `path`, replacing what is there atomically.

    linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N gives the unnamed file a name; os.link only calls
    linkat (rather than link) when a dir_fd is given. A new destination gets its name directly (nothing
    can be left over); an existing one is replaced through a temporary name and a rename, both atomic,
    and the temporary name is removed if the rename fails (say, `path` became a directory meanwhile)."""
    proc_fd = os.open("/proc/self/fd", os.O_RDONLY)
    try:
        try:
            os.link(str(fileno), path, src_dir_fd=proc_fd, follow_symlinks=True)
            return
        except FileExistsError:
            pass
        tmp_name = folder / f".{path.name}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        os.link(str(fileno), tmp_name, src_dir_fd=proc_fd, follow_symlinks=True)
    finally:
        os.close(proc_fd)
    try:
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
