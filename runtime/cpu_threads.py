"""How many CPU threads the runtime's kernels use, chosen for a host that is never idle.

TVM's CPU thread pool, left to its defaults, collapses on a busy machine (issue 15: 0.01 of the idle
decode rate beside two 2-thread torch loops): it takes half of all cores the machine has (not the ones
this process may use), pins each worker to one core (a pinned worker cannot leave a core another
process is using), and every parallel kernel ends in a barrier that waits for all workers, so one
descheduled worker stalls each of a decode step's ~100 small kernels; and idle workers spin
(300000 yields) before they sleep, so they hold the CPU the other work needs and, never sleeping,
lose the scheduler's wake-up preference. Three remedies:

1. `set_thread_pool_defaults()` (run when tensorpress is imported, before TVM makes its pool): the
   pool gets as many threads as CPUs this process may really use (its affinity mask, capped by a
   cgroup CPU quota), its workers are not pinned (TVM_BIND_THREADS=0) and sleep as soon as they are
   idle (TVM_THREAD_POOL_SPIN_COUNT=0: on a busy CPU a woken worker is scheduled at once). A
   variable the user set is left alone.
2. `ThreadCountChooser`: per calling thread and kind of call, each compiled call runs either
   single-threaded (TVM then runs the kernel inline, no barrier) or on the whole pool, whichever ran
   faster lately; it re-tries the other every few dozen calls, so it follows the load as it comes and
   goes. Small kernels on a busy CPU end up single-threaded; big ones on an idle CPU use the pool.
3. Where the user chose the pool's size or pinning (TVM_NUM_THREADS / TVM_BIND_THREADS), the chooser
   stays out of the way and every call uses the pool as configured.

Standard library only (runs before TVM is loaded, and in a runtime-only bundle).
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The values tensorpress set itself, "NAME=value,..." (inherited by child processes, which must not
# take them for the user's choice).
DEFAULTS_MARKER = "TENSORPRESS_THREAD_POOL_DEFAULTS"
_POOL_VARIABLES = ("TVM_NUM_THREADS", "TVM_BIND_THREADS", "TVM_THREAD_POOL_SPIN_COUNT", "OMP_NUM_THREADS")


def user_set_variables(environ: Any = os.environ) -> set[str]:
    """The thread-pool variables the user set (present, and not a default tensorpress set)."""
    ours = set(environ.get(DEFAULTS_MARKER, "").split(","))
    return {name for name in _POOL_VARIABLES if name in environ and f"{name}={environ[name]}" not in ours}


USER_SET = user_set_variables()  # as found when tensorpress was imported
_CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = _CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs' worth of time the process's cgroup may use (quota / period), or None without a quota.
    Reads cgroup v2 `cpu.max` ("max 100000" or "150000 100000") or v1 `cpu.cfs_quota_us`/`cfs_period_us`."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, _, path = line.partition(":")[2].partition(":")
        relative = path.lstrip("/")
        if hierarchy == "":  # cgroup v2 (unified)
            for folder in (root / relative, root / "unified" / relative, root):
                try:
                    quota, period = (folder / "cpu.max").read_text().split()[:2]
                except (OSError, ValueError):
                    continue
                return None if quota == "max" else int(quota) / int(period)
        if "cpu" in hierarchy.split(","):  # cgroup v1
            for folder in (root / "cpu" / relative, root / "cpu,cpuacct" / relative, root / "cpu"):
                try:
                    quota_us = int((folder / "cpu.cfs_quota_us").read_text())
                    period_us = int((folder / "cpu.cfs_period_us").read_text())
                except (OSError, ValueError):
                    continue
                return None if quota_us <= 0 else quota_us / period_us
    return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by its cgroup quota (rounded up), >= 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def set_thread_pool_defaults(environ: Any = os.environ) -> None:
    """Size TVM's pool from the usable CPUs and leave its workers unpinned, unless the user chose."""
    user = user_set_variables(environ)
    defaults = {
        "TVM_NUM_THREADS": str(usable_cpus()),
        "TVM_BIND_THREADS": "0",  # a pinned worker cannot leave a busy core
        # Idle workers sleep at once. The wake-up this costs each parallel kernel on an idle CPU is
        # why the chooser below may run a call single-threaded instead: a 2-iteration parallel loop
        # took 9-11 us a call at spin 0 against 4 us at spin 100 or 1000 (calls 0-20 us apart; 2
        # cores, load ~6). A short spin does not pay: spin 1000 decoded at 45 tok/s idle and 10
        # loaded against 315 and 132 at spin 0 in the same window (decode_under_load_cpu_spin1000.json).
        "TVM_THREAD_POOL_SPIN_COUNT": "0",
    }
    if "OMP_NUM_THREADS" in user:  # TVM reads it when TVM_NUM_THREADS is unset
        defaults.pop("TVM_NUM_THREADS")
    chosen = {name: value for name, value in defaults.items() if name not in user}
    environ.update(chosen)
    environ[DEFAULTS_MARKER] = ",".join(f"{name}={value}" for name, value in chosen.items())


def pool_threads() -> int:
    """The pool's size TVM will use (TVM_NUM_THREADS, else OMP_NUM_THREADS, else the usable CPUs)."""
    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        try:
            return max(1, int(os.environ[name]))
        except (KeyError, ValueError):
            continue
    return usable_cpus()


def adaptive() -> bool:
    """Whether the chooser may pick threads per call: not when the user sized or pinned the pool,
    nor when the pool has one thread anyway."""
    user_chose = USER_SET & {"TVM_NUM_THREADS", "OMP_NUM_THREADS", "TVM_BIND_THREADS"}
    return not user_chose and os.environ.get("TVM_BIND_THREADS") == "0" and pool_threads() > 1


KDL_CPU = 1  # DLPack device type of the host
_KIND_SHARE_ALL_CORES = -3  # TVM ThreadGroup::kSpecifyThreadShareAllCore: no pinning, just a count


class ThreadCountChooser:
    """Runs compiled calls single-threaded or on the whole pool, whichever was faster lately (per key).

    One chooser serves one calling thread (TVM's pool and its size are per calling thread). For each
    key (e.g. ("decode", batch size)) it keeps the last `WINDOW` wall times of each choice; it first
    tries each choice `WINDOW - 1` times, then takes the one with the lower median and re-tries the
    other after `EXPLORE_EVERY` calls. A re-try that loses doubles the wait before the next (up to
    `EXPLORE_MAX`): on a busy CPU one stalled pool call costs as much as many single-threaded ones.
    """

    WINDOW = 3
    EXPLORE_EVERY = 16
    EXPLORE_MAX = 512

    def __init__(
        self, set_threads: Callable[[int], None], max_threads: int, clock: Callable[[], float] = time.perf_counter
    ):
        self._set_threads = set_threads
        self._clock = clock
        self.choices = (1, max_threads)
        self._current = max_threads
        self._times: dict[Any, dict[int, deque[float]]] = {}
        self._next_try: dict[Any, int] = {}  # call count at which the losing choice is re-tried
        self._wait: dict[Any, int] = {}  # calls between re-tries
        self._calls: dict[Any, int] = {}
        set_threads(max_threads)  # the pool is made at full size first, so it can be used later

    def choose(self, key: Any) -> int:
        times = self._times.setdefault(key, {n: deque(maxlen=self.WINDOW) for n in self.choices})
        calls = self._calls[key] = self._calls.get(key, 0) + 1
        for n in self.choices:
            if len(times[n]) < self.WINDOW - 1:
                return n
        best = min(self.choices, key=lambda n: statistics.median(times[n]))
        wait = self._wait.setdefault(key, self.EXPLORE_EVERY)
        if calls >= self._next_try.setdefault(key, calls + wait):
            self._next_try[key] = calls + wait
            return self.choices[1] if best == self.choices[0] else self.choices[0]
        return best

    def best(self, key: Any) -> int | None:
        """The choice with the lower median time for `key`, or None while still trying both."""
        times = self._times.get(key)
        if times is None or any(len(times[n]) < self.WINDOW - 1 for n in self.choices):
            return None
        return min(self.choices, key=lambda n: statistics.median(times[n]))

    def run(self, key: Any, call: Callable[[], Any]) -> Any:
        """call() on the chosen number of threads, timed (the call must finish its work on return)."""
        threads = self.choose(key)
        if threads != self._current:
            self._set_threads(threads)
            self._current = threads
        before = self.best(key)
        start = self._clock()
        result = call()
        self._times[key][threads].append(self._clock() - start)
        if before is not None and threads != before:  # a re-try: wait longer if it lost again
            samples = self._times[key][threads]
            if samples[-1] < statistics.median(self._times[key][before]):  # won: measure it afresh
                self._times[key][threads] = deque([samples[-1]], maxlen=self.WINDOW)
                self._wait[key] = self.EXPLORE_EVERY
            else:
                self._wait[key] = min(self.EXPLORE_MAX, self._wait[key] * 2)
        return result


def tvm_thread_setter() -> Callable[[int], None]:
    """set(n): the calling thread's TVM pool runs kernels on n threads (n = 1: inline, no barrier)."""
    from tensorpress.runtime import tvm_runtime

    configure = tvm_runtime.get_global_func("runtime.config_threadpool")

    def set_threads(n: int) -> None:
        configure(_KIND_SHARE_ALL_CORES, n, [str(i) for i in range(n)])

    return set_threads


_per_thread = threading.local()


def chooser_for_this_thread() -> ThreadCountChooser | None:
    """The calling thread's chooser (one per OS thread: TVM's pool size is per thread), or None when
    the pool must be left as the user configured it (see `adaptive`)."""
    if not adaptive():
        return None
    chooser = getattr(_per_thread, "chooser", None)
    if chooser is None:
        chooser = _per_thread.chooser = ThreadCountChooser(tvm_thread_setter(), pool_threads())
    return chooser
