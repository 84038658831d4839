"""The RPC measurer times real kernels on every server of a loopback TVM tracker, agrees with the local
measurer, turns a failed candidate into math.inf, and says in one sentence what to start when the tracker
or its servers are missing."""

import math
import os

import pytest

from tensorpress.compiler.tuning.loopback_rpc import LoopbackRpcCluster, free_port
from tensorpress.compiler.tuning.measure import ArgSpec, BuiltCandidate, LocalMeasurer, TimingPlan
from tensorpress.compiler.tuning.rpc_measure import RpcMeasurer, parse_tracker_address
from tensorpress.errors import ConfigError, RpcTrackerError

N = 128
PLAN = TimingPlan(repeat=3, min_repeat_ms=5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LoopbackRpcCluster(servers=2, key="test-cpu", log_dir=tmp_path_factory.mktemp("rpc")) as running:
        groups = running.process_groups()
        yield running
    for group in groups:  # the tracker, the servers and their session and popen children are all gone
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)


def _matmul_library(folder, suffix: str):
    """A 128^3 fp32 matmul (milliseconds: long enough to time, a real kernel) exported as `suffix`."""
    import tvm
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def matmul(a: T.Buffer((N, N), "float32"), b: T.Buffer((N, N), "float32"), c: T.Buffer((N, N), "float32")):
        for i, j, k in T.grid(N, N, N):
            with T.sblock("c"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    c[vi, vj] = T.float32(0)
                c[vi, vj] = c[vi, vj] + a[vi, vk] * b[vk, vj]

    path = folder / f"matmul{suffix}"
    tvm.compile(tvm.IRModule({"matmul": matmul}), target="llvm").export_library(str(path))
    return path


ARGS = (ArgSpec((N, N), "float32"),) * 3


def test_times_on_both_servers_like_the_local_measurer(cluster, tmp_path):
    tar = _matmul_library(tmp_path, ".tar")
    measurer = RpcMeasurer(cluster.tracker, cluster.key, PLAN)
    assert measurer.num_servers == 2
    remote = measurer.measure([BuiltCandidate(tar, "matmul", ARGS)] * 4)
    (local,) = LocalMeasurer(PLAN).measure([BuiltCandidate(_matmul_library(tmp_path, ".so"), "matmul", ARGS)])
    assert all(0 < t < math.inf for t in remote)
    # same CPU, same kernel: within a loose factor (the machine is shared, the servers run at once)
    assert all(local / 4 < t < local * 4 for t in remote), (remote, local)
    # each server logs the modules it loads: both took candidates
    assert all("load_module" in log.read_text() for log in cluster.server_logs())


def test_a_failed_candidate_is_inf_and_the_others_still_run(cluster, tmp_path):
    tar = _matmul_library(tmp_path, ".tar")
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(b"not a tar file")
    candidates = [
        BuiltCandidate(tar, "no_such_function", ARGS),
        BuiltCandidate(corrupt, "matmul", ARGS),
        BuiltCandidate(tar, "matmul", ARGS),
    ]
    missing_entry, corrupt_library, good = RpcMeasurer(cluster.tracker, cluster.key, PLAN).measure(candidates)
    assert missing_entry == math.inf and corrupt_library == math.inf
    assert 0 < good < math.inf


def test_no_server_under_the_key_says_what_to_start(cluster):
    with pytest.raises(RpcTrackerError) as err:
        RpcMeasurer(cluster.tracker, "no-such-key")
    message = str(err.value)
    assert cluster.tracker in message and "'no-such-key'" in message
    assert "python -m tvm.exec.rpc_server --tracker" in message


def test_an_unreachable_tracker_says_what_to_start():
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(RpcTrackerError) as err:
        RpcMeasurer(address, "cpu")
    assert address in str(err.value) and "python -m tvm.exec.rpc_tracker" in str(err.value)


@pytest.mark.parametrize("text", ["localhost", "host:", ":9190", "host:port", "host:70000"])
def test_a_malformed_tracker_address_is_a_config_error(text):
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_tracker_address(text)
