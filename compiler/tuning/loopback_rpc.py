"""A TVM RPC tracker and N RPC servers on this machine (loopback), for tests, benchmarks and for tuning
on the local CPU through the same path as on remote devices.

    with LoopbackRpcCluster(servers=2, key="cpu") as cluster:
        measurer = RpcMeasurer(cluster.tracker, cluster.key)     # "127.0.0.1:PORT", "cpu"

Each process is TVM's own (`python -m tvm.exec.rpc_tracker`, `python -m tvm.exec.rpc_server --tracker
... --key ...`), started in its own process group on a free port; leaving the block kills each group by
its id (the servers fork one child per session, which dies with it), even when the block raised.
Each server's log is written to `log_dir/rpc_server_<i>.log` (the server logs every module it loads).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class LoopbackRpcCluster:
    """A tracker and `servers` RPC servers registered under `key`, all on 127.0.0.1."""

    def __init__(self, servers: int = 2, key: str = "tensorpress-cpu", log_dir: Path | None = None):
        self.num_servers = servers
        self.key = key
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="tensorpress-rpc-"))
        self.tracker_port = 0
        self._processes: list[subprocess.Popen] = []

    @property
    def tracker(self) -> str:
        return f"{LOOPBACK}:{self.tracker_port}"

    def server_logs(self) -> list[Path]:
        return [self.log_dir / f"rpc_server_{i}.log" for i in range(self.num_servers)]

    def process_groups(self) -> list[int]:
        """The process group ids of the tracker and the servers (each started as its group's leader)."""
        return [process.pid for process in self._processes]

    def __enter__(self) -> LoopbackRpcCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self, timeout_s: float = 60.0) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.tracker_port = free_port()
        self._spawn(
            [
                "tvm.exec.rpc_tracker",
                "--host",
                LOOPBACK,
                "--port",
                str(self.tracker_port),
                "--port-end",  # TVM binds the first free port in [port, port-end); the default end is 9199
                str(self.tracker_port + 1),
            ],
            self.log_dir / "rpc_tracker.log",
        )
        # everything starts at once: the tracker and each server import TVM twice (a launcher, then TVM's
        # popen worker), and a server retries the tracker every 5 s until it listens
        for log in self.server_logs():
            port = free_port()
            args = ["tvm.exec.rpc_server", "--host", LOOPBACK, "--port", str(port), "--port-end", str(port + 1)]
            self._spawn([*args, "--tracker", self.tracker, "--key", self.key], log)
        _wait_for_port(self.tracker_port, timeout_s, self._processes[0])
        self._wait_for_servers(timeout_s)

    def stop(self) -> None:
        """Kill every process group this cluster started (servers first), and reap them."""
        for process in reversed(self._processes):
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        for process in self._processes:  # the children left in a group are reaped by init, not by us
            _wait_until_group_is_empty(process.pid, timeout_s=10.0)
        self._processes.clear()

    def _spawn(self, module_args: list[str], log: Path) -> None:
        with open(log, "wb") as out:
            self._processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", *module_args],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: stop() kills it with its children
                )
            )

    def _wait_for_servers(self, timeout_s: float) -> None:
        from tvm import rpc

        deadline = time.monotonic() + timeout_s
        while True:
            dead = [p.args for p in self._processes if p.poll() is not None]
            if dead:
                raise RuntimeError(f"an RPC process exited at start: {dead[0]!r} (logs in {self.log_dir})")
            tracker = rpc.connect_tracker(LOOPBACK, self.tracker_port)
            try:
                registered = [s for s in tracker.summary()["server_info"] if s["key"] == f"server:{self.key}"]
            finally:
                tracker.close()
            if len(registered) >= self.num_servers:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(registered)} of {self.num_servers} RPC servers registered in {timeout_s} s")
            time.sleep(0.2)


def _wait_for_port(port: int, timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited at start with status {process.returncode}")
        # a fresh socket with a short timeout each time: a SYN the tracker's backlog drops is retried by the
        # kernel after 1, 3, 7, ... s on the same socket
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {LOOPBACK}:{port} after {timeout_s} s")


def _wait_until_group_is_empty(group: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
