"""Build folders of compiles that were killed (SIGKILL skips every clean-up) are removed by the next one;
a folder whose lock is held (a live compile, whatever its pid looks like from here) stays."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

from tensorpress.compiler.build_folder import LOCK_FILE, PREFIX, build_folder, remove_orphaned_build_folders


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)  # that process has exited


def _folder(parent, name, lock=True):
    folder = parent / name
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "library.so").write_bytes(b"x")
    if lock:
        (folder / LOCK_FILE).write_text("")
    return folder


def test_folders_of_dead_compiles_go_and_live_ones_stay(tmp_path):
    dead = _dead_pid()
    orphan = _folder(tmp_path, f"{PREFIX}{dead}-abc")
    live = _folder(tmp_path, f"{PREFIX}{os.getpid()}-def")
    unrelated = _folder(tmp_path, f"{PREFIX}oldstyle")
    no_lock_yet = _folder(tmp_path, f"{PREFIX}{dead}-ghi", lock=False)
    assert remove_orphaned_build_folders(tmp_path) == [orphan]
    assert not orphan.exists() and live.exists() and unrelated.exists() and no_lock_yet.exists()


def test_a_held_lock_keeps_a_folder_whose_pid_looks_dead(tmp_path):
    """A compile in another PID namespace (or host) sharing the folder: its pid means nothing here."""
    busy = _folder(tmp_path, f"{PREFIX}{_dead_pid()}-abc")
    with open(busy / LOCK_FILE) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        held = subprocess.run(
            [sys.executable, "-c", "import sys, pathlib; from tensorpress.compiler.build_folder import "
             "remove_orphaned_build_folders as r; print(len(r(pathlib.Path(sys.argv[1]))))", str(tmp_path)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert held.stdout.strip() == "0" and busy.exists(), held.stderr
    assert remove_orphaned_build_folders(tmp_path) == [busy]


def test_the_build_folder_is_locked_while_in_use_and_gone_after(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    with build_folder() as folder:
        assert folder.parent == tmp_path and (folder / LOCK_FILE).exists()
        assert remove_orphaned_build_folders(tmp_path) == []
    assert not folder.exists()
