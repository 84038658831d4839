"""A process killed (SIGKILL: no handler, no cleanup) in the middle of `atomic_output` leaves nothing at
the destination; with O_TMPFILE (Linux) nothing at all, since the bytes so far live in an unnamed file.
A destination that cannot be written is refused before any work, and no failure leaves a file behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tensorpress.errors import ConfigError
from tensorpress.runtime.atomic_file import check_destination

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


# Destinations that cannot be written are refused up front, in one sentence; every failure leaves the
# folder as it was (no complete hidden copy beside the destination).

WRITERS = ["o_tmpfile", "fallback"]


@pytest.fixture(params=WRITERS)
def writer(request, monkeypatch):
    """atomic_output through O_TMPFILE (where Linux has it) or through its mkstemp fallback."""
    if request.param == "fallback":
        monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    elif not hasattr(os, "O_TMPFILE"):
        pytest.skip("O_TMPFILE is Linux only")
    from tensorpress.runtime.atomic_file import atomic_output

    return atomic_output


def unwritable_folder(tmp_path):
    """A folder this process cannot create files in: read-only by mode, or (root ignores modes) sysfs."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_a_directory_as_destination_is_refused_and_nothing_is_left(writer, tmp_path):
    (tmp_path / "out").mkdir()
    with (
        pytest.raises(ConfigError, match=r"out is a directory; give the output file a file name\.$"),
        writer(tmp_path / "out") as f,
    ):
        f.write(b"x" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and list((tmp_path / "out").iterdir()) == []


def test_a_failed_rename_removes_the_temporary_name(writer, tmp_path):
    """The destination turns into a directory while the file is written: the final rename fails, and the
    complete file under its temporary name must go with it."""
    (tmp_path / "out").write_bytes(b"old")  # replacing an existing file takes the temporary-name path
    with pytest.raises(OSError), writer(tmp_path / "out") as f:
        f.write(b"x" * 1000)
        (tmp_path / "out").unlink()
        (tmp_path / "out").mkdir()
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and list((tmp_path / "out").iterdir()) == []


def test_an_error_inside_the_write_keeps_the_old_file(writer, tmp_path):
    (tmp_path / "out").write_bytes(b"old")
    with pytest.raises(RuntimeError), writer(tmp_path / "out") as f:
        f.write(b"new")
        raise RuntimeError("stop")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out").read_bytes() == b"old"


def test_an_unwritable_folder_is_refused_before_anything_is_written(tmp_path):
    folder = unwritable_folder(tmp_path)
    before = sorted(os.listdir(folder))
    with pytest.raises(ConfigError, match=r"is not writable \(permission denied\); choose another artifact\.$"):
        check_destination(folder / "m.tpk", "artifact")
    with pytest.raises(ConfigError, match="is not writable"):
        check_destination(folder / "new" / "sub" / "m.tpk", "artifact")  # the nearest folder that exists
    assert sorted(os.listdir(folder)) == before


def test_a_file_in_the_way_of_the_folder_is_refused(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(ConfigError, match=r"taken is a file, not a folder; choose another output file\.$"):
        check_destination(tmp_path / "taken" / "sub" / "out.bin")


def test_missing_folders_are_fine_and_not_created_by_the_check(writer, tmp_path):
    check_destination(tmp_path / "a" / "b" / "out.bin")
    assert list(tmp_path.iterdir()) == []
    with writer(tmp_path / "a" / "b" / "out.bin") as f:
        f.write(b"data")
    assert (tmp_path / "a" / "b" / "out.bin").read_bytes() == b"data"
