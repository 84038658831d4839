"""Build folders of compiles that were killed (SIGKILL skips every clean-up) are removed by the next one."""

from __future__ import annotations

import os
import subprocess
import sys

from tensorpress.compiler.build_folder import PREFIX, remove_orphaned_build_folders


def test_folders_of_dead_compiles_go_and_live_ones_stay(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    orphan = tmp_path / f"{PREFIX}{dead_pid}-abc"
    live = tmp_path / f"{PREFIX}{os.getpid()}-def"
    unrelated = tmp_path / f"{PREFIX}oldstyle"
    for folder in (orphan, live, unrelated):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "library.so").write_bytes(b"x")
    assert remove_orphaned_build_folders(tmp_path) == [orphan]
    assert not orphan.exists() and live.exists() and unrelated.exists()
