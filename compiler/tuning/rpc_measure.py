"""Measuring candidates on the devices of a TVM RPC tracker: every server registered under a key, one
candidate in flight per server.

    measurer = RpcMeasurer("10.0.0.5:9190", "h100")     # servers: python -m tvm.exec.rpc_server
    seconds = measurer.measure(candidates)               #   --tracker 10.0.0.5:9190 --key h100

At the start of `measure` one session is requested from the tracker per registered server (the tracker
hands each request a free server), and a thread pool of that size times the candidates: a worker takes
a session, uploads the candidate's library (a `.tar` of objects, linked on the server, so the server's
compiler and libc are used), times it with the remote time_evaluator, and gives the session back. The
RPC calls release the GIL, so the servers run at once. A candidate that fails to link, load or run is
`math.inf`; a session that no longer answers is dropped and the others carry on.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import queue
import socket
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tensorpress.compiler.tuning.measure import BuiltCandidate, TimingPlan, random_arguments
from tensorpress.errors import ConfigError, RpcTrackerError

CONNECT_TIMEOUT_S = 5.0


def parse_tracker_address(tracker: str) -> tuple[str, int]:
    """ "HOST:PORT" -> (host, port), or a ConfigError saying what was expected."""
    host, sep, port = tracker.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"RPC tracker address {tracker!r} is not HOST:PORT; give it as e.g. 127.0.0.1:9190.")
    return host, int(port)


class RpcMeasurer:
    """Times built candidates on the servers a TVM RPC tracker knows under `key` (the Measurer protocol).

    device: the remote device kind the kernels run on ("cpu" or "cuda"). session_timeout_s: the server
    ends a session after this many seconds (0: never), so a hung kernel cannot hold a server forever.
    """

    library_suffix = ".tar"

    def __init__(
        self,
        tracker: str,
        key: str,
        plan: TimingPlan | None = None,
        device: str = "cpu",
        session_timeout_s: float = 600.0,
    ):
        self.host, self.port = parse_tracker_address(tracker)
        self.key = key
        self.plan = plan or TimingPlan()
        self.device = device
        self.session_timeout_s = session_timeout_s
        self._upload_names = itertools.count()
        self.num_servers = self.registered_servers()

    @property
    def tracker(self) -> str:
        return f"{self.host}:{self.port}"

    def registered_servers(self) -> int:
        """How many servers the tracker has under `key`; RpcTrackerError when none or unreachable."""
        summary = self._tracker_summary()
        servers = sum(1 for s in summary.get("server_info", []) if s.get("key") == f"server:{self.key}")
        if servers == 0:
            raise RpcTrackerError(
                f"the RPC tracker at {self.tracker} has no server under key {self.key!r}; start one on each "
                f"device with `python -m tvm.exec.rpc_server --tracker {self.tracker} --key {self.key}`."
            )
        return servers

    def measure(self, candidates: Sequence[BuiltCandidate]) -> list[float]:
        """Median seconds of one call for each candidate, in order; math.inf where it failed."""
        if not candidates:
            return []
        sessions: queue.Queue = queue.Queue()
        live = [0]  # sessions not yet found dead (guarded by lock)
        lock = threading.Lock()
        for _ in range(min(self.num_servers, len(candidates))):
            sessions.put(self._request_session())
            live[0] += 1

        def measure_one(candidate: BuiltCandidate) -> float:
            with lock:
                if live[0] == 0:
                    return math.inf
            session = sessions.get()
            seconds, alive = self._time_on(session, candidate)
            if alive:
                sessions.put(session)
            else:
                with lock:
                    live[0] -= 1
                    if live[0] == 0:  # wake the workers waiting for a session: nothing is left to run on
                        for _ in range(self.num_servers):
                            sessions.put(None)
            return seconds

        with ThreadPoolExecutor(max_workers=sessions.qsize(), thread_name_prefix="rpc-measure") as pool:
            return list(pool.map(measure_one, candidates))

    def _time_on(self, session: Any, candidate: BuiltCandidate) -> tuple[float, bool]:
        """(median seconds or inf, whether the session still answers)."""
        if session is None:
            return math.inf, False
        import tvm

        remote_name = f"candidate{next(self._upload_names)}{candidate.library.suffix}"
        try:
            session.upload(str(candidate.library), target=remote_name)
            module = session.load_module(remote_name)
            device = session.device(self.device)
            tensors = [tvm.runtime.tensor(a, device) for a in random_arguments(candidate.args)]
            timer = module.time_evaluator(
                candidate.entry, device, repeat=self.plan.repeat, min_repeat_ms=self.plan.min_repeat_ms
            )
            seconds = float(timer(*tensors).median)
        except Exception:  # noqa: BLE001 - a candidate that cannot run is a failed trial, never a crash
            return math.inf, _answers(session)
        with contextlib.suppress(Exception):  # the session's folder is removed when it ends anyway
            session.remove(remote_name)
        return seconds, True

    def _request_session(self) -> Any:
        tracker = self._connect_tracker()
        try:
            return tracker.request(self.key, priority=1, session_timeout=self.session_timeout_s, max_retry=2)
        except (RuntimeError, OSError) as err:
            raise RpcTrackerError(
                f"the RPC tracker at {self.tracker} gave no session for key {self.key!r} ({err}); check that "
                f"`python -m tvm.exec.rpc_server --tracker {self.tracker} --key {self.key}` is running."
            ) from err
        finally:
            tracker.close()

    def _tracker_summary(self) -> dict:
        tracker = self._connect_tracker()
        try:
            return dict(tracker.summary())
        except (RuntimeError, OSError) as err:
            raise self._unreachable(err) from err
        finally:
            tracker.close()

    def _connect_tracker(self) -> Any:
        from tvm import rpc

        # TVM retries a refused connection for 60 s; a plain connect first fails in seconds instead
        try:
            socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_S).close()
            return rpc.connect_tracker(self.host, self.port)
        except (RuntimeError, OSError) as err:
            raise self._unreachable(err) from err

    def _unreachable(self, err: Exception) -> RpcTrackerError:
        return RpcTrackerError(
            f"cannot reach an RPC tracker at {self.tracker} ({err}); start one there with "
            f"`python -m tvm.exec.rpc_tracker --host {self.host} --port {self.port}` and its servers with "
            f"`python -m tvm.exec.rpc_server --tracker {self.tracker} --key {self.key}`."
        )


def _answers(session: Any) -> bool:
    """Whether an RPC session still answers a call (a kernel that crashed its server does not)."""
    try:
        session.get_function("tvm.rpc.server.workpath")("")
        return True
    except Exception:  # noqa: BLE001 - any failure means the session is gone
        return False
