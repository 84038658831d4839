"""TVM's own log lines, kept out of a compile's output.

TVM's C++ side logs straight to the process's stderr (file descriptor 2), past Python, e.g. three times
per model with an embedding lookup:

    [13:58:09] /project/include/tvm/topi/transform.h:1261: Warning: Fast mode segfaults when there are ...

No TVM setting turns these off (TVM_LOG_DEBUG only adds the verbose VLOG lines), so while a compile runs
`tvm_log_routed()` puts a pipe in place of fd 2: a thread passes every line through to the real stderr
as it comes, except TVM's log lines, which go to the `tensorpress.tvm` logger at DEBUG (shown where a
program configures logging so). TENSORPRESS_TVM_LOG=1 leaves stderr alone (to see them raw, or what a
crash inside TVM prints, which the pipe would lose with the process).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator

TVM_LOG_LINE = re.compile(rb"^\[\d{2}:\d{2}:\d{2}\] \S+:\d+: ")  # [hh:mm:ss] file:line: (TVM's LOG format)
log = logging.getLogger("tensorpress.tvm")


_routing = threading.Lock()  # fd 2 is the process's: one routing at a time, an inner or concurrent block passes


@contextlib.contextmanager
def tvm_log_routed() -> Iterator[None]:
    """Within the block, TVM's log lines are held back and given to the `tensorpress.tvm` logger when it
    ends (fd 2 then is stderr again, so a logging handler on stderr cannot feed the pipe); all else
    written to fd 2 reaches stderr unchanged, in order, as it comes."""
    if os.environ.get("TENSORPRESS_TVM_LOG") == "1" or not _routing.acquire(blocking=False):
        yield
        return
    try:
        _flush_stderr()
        try:
            stderr_copy = os.dup(2)
        except OSError:  # no fd 2 at all: nothing to route
            yield
            return
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        held: list[str] = []
        forwarder = threading.Thread(target=_forward, args=(read_end, stderr_copy, held), daemon=True)
        forwarder.start()
        try:
            yield
        finally:
            _flush_stderr()
            os.dup2(stderr_copy, 2)  # the pipe's last write end closes: the forwarder reads to the end
            forwarder.join(timeout=10)
            os.close(stderr_copy)
            for line in held:
                log.debug("%s", line)
    finally:
        _routing.release()


def _flush_stderr() -> None:
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()


def _forward(read_end: int, stderr_fd: int, held: list[str]) -> None:
    """Copy the pipe to `stderr_fd` line by line, holding TVM's log lines back in `held`."""
    pending = b""
    with open(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                _route(line + b"\n", stderr_fd, held)
    if pending:
        _route(pending, stderr_fd, held)


def _route(line: bytes, stderr_fd: int, held: list[str]) -> None:
    if TVM_LOG_LINE.match(line):
        held.append(line.decode(errors="replace").rstrip())
    else:
        with contextlib.suppress(OSError):
            os.write(stderr_fd, line)
