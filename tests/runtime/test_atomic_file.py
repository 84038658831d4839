"""A process killed (SIGKILL: no handler, no cleanup) in the middle of `atomic_output` leaves nothing at
the destination; with O_TMPFILE (Linux) nothing at all, since the bytes so far live in an unnamed file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

WRITTEN = 3 << 20  # bytes the child writes (and flushes) before it reports and waits to be killed

CHILD = textwrap.dedent(
    """
    import os, sys, time
    if sys.argv[2] == "fallback":
        del os.O_TMPFILE  # atomic_output then takes its mkstemp path
    from tensorpress.runtime.atomic_file import atomic_output
    with atomic_output(sys.argv[1]) as f:
        f.write(b"x" * int(sys.argv[3]))
        f.flush()
        print(f.fileno(), flush=True)
        time.sleep(120)
    """
)


def kill_inside_the_write(destination, mode: str) -> str:
    """Start a child writing `destination` atomically, SIGKILL it mid-write; what its file was (the
    /proc/PID/fd link) while it ran."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(destination), mode, str(WRITTEN)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        fd = child.stdout.readline().strip()  # blocks until the bytes are written
        assert fd, "the child exited before writing"
        open_file = f"/proc/{child.pid}/fd/{fd}"
        link, size = os.readlink(open_file), os.stat(open_file).st_size
        assert size == WRITTEN
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    return link


@pytest.mark.skipif(not hasattr(os, "O_TMPFILE"), reason="O_TMPFILE is Linux only")
def test_killed_mid_write_leaves_nothing(tmp_path):
    link = kill_inside_the_write(tmp_path / "out.bin", "o_tmpfile")
    assert link.startswith(str(tmp_path)) and link.endswith("(deleted)")  # an unnamed file in that folder
    assert list(tmp_path.iterdir()) == []


def test_killed_mid_write_without_o_tmpfile_leaves_no_partial_destination(tmp_path):
    """Without O_TMPFILE a SIGKILL leaves the hidden temporary file (nothing can remove it); the
    destination itself never appears half written."""
    link = kill_inside_the_write(tmp_path / "out.bin", "fallback")
    assert os.path.basename(link).startswith(".out.bin.")
    assert not (tmp_path / "out.bin").exists()
    assert all(p.name.startswith(".out.bin.") and p.name.endswith(".tmp") for p in tmp_path.iterdir())
