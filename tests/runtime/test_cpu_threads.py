"""The CPU thread choice: the pool sized from the CPUs the process may use (affinity, cgroup quota),
user settings kept, and per call one thread or the pool, whichever ran faster lately."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tensorpress.runtime import cpu_threads
from tensorpress.runtime.cpu_threads import ThreadCountChooser, cgroup_cpu_limit, set_thread_pool_defaults


def _fake_cgroup(tmp_path, proc_line: str, files: dict[str, str]):
    proc = tmp_path / "proc_cgroup"
    proc.write_text(proc_line + "\n")
    for name, text in files.items():
        path = tmp_path / "fs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "fs", proc


@pytest.mark.parametrize(
    "proc_line, files, expected",
    [
        ("0::/job", {"job/cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2, 1.5 CPUs
        ("0::/job", {"job/cpu.max": "max 100000\n"}, None),  # v2 without a quota
        ("4:cpu,cpuacct:/job", {"cpu/job/cpu.cfs_quota_us": "50000", "cpu/job/cpu.cfs_period_us": "100000"}, 0.5),
        ("4:cpu,cpuacct:/job", {"cpu/job/cpu.cfs_quota_us": "-1", "cpu/job/cpu.cfs_period_us": "100000"}, None),
        ("4:memory:/job", {}, None),  # no cpu controller
    ],
)
def test_cgroup_quota_is_read_from_v1_and_v2(tmp_path, proc_line, files, expected):
    root, proc = _fake_cgroup(tmp_path, proc_line, files)
    assert cgroup_cpu_limit(root, proc) == expected


def test_usable_cpus_are_the_affinity_capped_by_the_quota_rounded_up(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_limit", lambda: 1.5)
    assert cpu_threads.usable_cpus() == 2
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_limit", lambda: None)
    assert cpu_threads.usable_cpus() == 4
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_limit", lambda: 0.2)
    assert cpu_threads.usable_cpus() == 1


def test_defaults_size_the_pool_and_unpin_it_but_keep_what_the_user_set(monkeypatch):
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: 3)
    env: dict[str, str] = {}
    set_thread_pool_defaults(env)
    pool = {k: v for k, v in env.items() if k.startswith("TVM_")}
    assert pool == {"TVM_NUM_THREADS": "3", "TVM_BIND_THREADS": "0", "TVM_THREAD_POOL_SPIN_COUNT": "0"}
    assert cpu_threads.user_set_variables(env) == set()
    # a child process inherits these; on 2 usable CPUs it sizes its own pool, they were not the user's
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: 2)
    set_thread_pool_defaults(env)
    assert env["TVM_NUM_THREADS"] == "2"
    user = {"TVM_NUM_THREADS": "7", "TVM_BIND_THREADS": "1", "TVM_THREAD_POOL_SPIN_COUNT": "5"}
    env = dict(user)
    set_thread_pool_defaults(env)
    assert {k: v for k, v in env.items() if k.startswith("TVM_")} == user
    assert cpu_threads.user_set_variables(env) == set(user)


def test_importing_tensorpress_sets_the_pool_from_the_affinity_mask():
    code = "import os, tensorpress; print(os.environ['TVM_NUM_THREADS'], os.environ['TVM_BIND_THREADS'])"
    env = {k: v for k, v in os.environ.items() if k not in cpu_threads._POOL_VARIABLES}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(cpu_threads.usable_cpus()), "0"]


class FakeClock:
    """Each call lasts what `costs[threads]` says (seconds), on a clock the test controls."""

    def __init__(self, costs):
        self.now, self.costs, self.threads = 0.0, costs, None

    def __call__(self):
        return self.now

    def call(self):
        self.now += self.costs[self.threads]


def _chooser(costs):
    clock = FakeClock(costs)
    switches = []

    def set_threads(n):
        clock.threads = n
        switches.append(n)

    return ThreadCountChooser(set_threads, 4, clock=clock), clock, switches


def test_the_faster_choice_wins_and_the_other_is_retried_now_and_then():
    chooser, clock, _ = _chooser({1: 1.0, 4: 3.0})  # a busy CPU: one thread is faster
    used = []
    for _ in range(100):
        chooser.run("decode", clock.call)
        used.append(clock.threads)
    assert used[:4].count(1) == 2 and used[:4].count(4) == 2  # each tried first
    assert used[4:].count(1) >= 90  # then one thread, with a rare look at the pool
    clock.costs = {1: 1.0, 4: 0.3}  # the CPU went idle: the pool wins once re-tried
    for _ in range(ThreadCountChooser.EXPLORE_MAX + 100):
        chooser.run("decode", clock.call)
        used.append(clock.threads)
    assert used[-100:].count(4) >= 95


def test_retries_of_a_losing_choice_become_rarer():
    chooser, clock, _ = _chooser({1: 1.0, 4: 50.0})  # a stalled pool: each re-try is expensive
    used = []
    for _ in range(1000):
        chooser.run("decode", clock.call)
        used.append(clock.threads)
    assert used.count(4) <= 2 + 7  # the first two, then re-tries after 16, 32, 64, ... 512 calls


def test_keys_are_chosen_for_separately():
    chooser, clock, _ = _chooser({1: 1.0, 4: 2.0})
    for _ in range(10):
        chooser.run("small", clock.call)
    clock.costs = {1: 5.0, 4: 1.0}
    for _ in range(10):
        chooser.run("big", clock.call)
    assert chooser.choose("big") == 4
    clock.costs = {1: 1.0, 4: 2.0}
    assert chooser.choose("small") == 1


def test_a_child_process_does_not_take_the_inherited_defaults_for_the_users_choice():
    env = {k: v for k, v in os.environ.items() if k not in cpu_threads._POOL_VARIABLES}
    set_thread_pool_defaults(env)  # what a parent that imported tensorpress passes on
    code = "import tensorpress.runtime.cpu_threads as c; print(sorted(c.USER_SET), c.adaptive())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", str(cpu_threads.usable_cpus() > 1)]
