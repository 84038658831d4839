"""While a compile runs, TVM's C++ log lines (written straight to fd 2) go to the `tensorpress.tvm` logger;
every other line reaches stderr unchanged and in order."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import logging, os, sys
    from tensorpress.compiler.tvm_log import tvm_log_routed
    held = []
    class Keep(logging.Handler):
        def emit(self, record):
            held.append(record.getMessage())
    logging.getLogger("tensorpress.tvm").addHandler(Keep())
    logging.getLogger("tensorpress.tvm").setLevel(logging.DEBUG)
    print("before", file=sys.stderr)
    with tvm_log_routed():
        os.write(2, b"[13:58:09] /project/include/tvm/topi/transform.h:1261: Warning: Fast mode segfaults\\n")
        print("ours 1", file=sys.stderr)
        os.write(2, b"a partial ")
        os.write(2, b"line\\n[01:02:03] /project/src/relax/ir/block_builder.cc:67: Warning: remaining blocks!\\n")
        print("ours 2", file=sys.stderr)
    print("after", file=sys.stderr)
    print("|".join(held))
    """
)


def test_tvm_lines_go_to_the_logger_and_the_rest_to_stderr():
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["before", "ours 1", "a partial line", "ours 2", "after"]
    assert result.stdout.strip().split("|") == [
        "[13:58:09] /project/include/tvm/topi/transform.h:1261: Warning: Fast mode segfaults",
        "[01:02:03] /project/src/relax/ir/block_builder.cc:67: Warning: remaining blocks!",
    ]


def test_tensorpress_tvm_log_leaves_stderr_alone():
    env_child = "import os; os.environ['TENSORPRESS_TVM_LOG'] = '1'\n" + CHILD
    result = subprocess.run([sys.executable, "-c", env_child], capture_output=True, text=True, timeout=60)
    assert "Fast mode segfaults" in result.stderr and result.stdout.strip() == ""
