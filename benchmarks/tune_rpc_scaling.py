"""The same tuning candidates measured on one RPC server and on two (TVM tracker on loopback, this CPU).

    .venv/bin/python benchmarks/tune_rpc_scaling.py                 # 16 candidates, 1 vs 2 servers
    .venv/bin/python benchmarks/tune_rpc_scaling.py --candidates 32

The candidates are one 256^3 fp32 matmul under N different tilings, built here once as `.tar` libraries
(the builder's work is not timed). For each cluster size a fresh tracker and servers start
(`LoopbackRpcCluster`), then:
  cold start   = RpcMeasurer created (tracker asked, sessions opened) until the first candidate's time
                 is back: what the first trial of a tune waits for once the servers are up. Nothing in
                 this process or on the servers imports tvm.s_tir.tensor_intrin (checked below).
  wall         = all N candidates measured in one `measure` call on the warm servers.
Ratio = wall(1 server) / wall(2 servers); 2 is ideal on a machine with a core free per server. The
servers' kernels each run on TVM's default threads, so on a 2-core machine shared with other jobs the
ratio says as much about the load (printed and stored) as about the measurer.
Writes benchmarks/results/tune_rpc_scaling_<device>_<time>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import environment, write_results  # noqa: E402

from tensorpress.compiler.tuning.loopback_rpc import LoopbackRpcCluster  # noqa: E402
from tensorpress.compiler.tuning.measure import ArgSpec, BuiltCandidate, TimingPlan  # noqa: E402
from tensorpress.compiler.tuning.rpc_measure import RpcMeasurer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 256
TILES = [(i, j) for i in (4, 8, 16, 32) for j in (8, 16, 32, 64)]


def build_candidates(folder: Path, count: int) -> list[BuiltCandidate]:
    """`count` tilings of one matmul, each exported as a .tar for the servers to link."""
    import tvm
    from tvm import s_tir
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def matmul(
        a: T.Buffer((SIZE, SIZE), "float32"), b: T.Buffer((SIZE, SIZE), "float32"), c: T.Buffer((SIZE, SIZE), "float32")
    ):
        for i, j, k in T.grid(SIZE, SIZE, SIZE):
            with T.sblock("c"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    c[vi, vj] = T.float32(0)
                c[vi, vj] = c[vi, vj] + a[vi, vk] * b[vk, vj]

    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3"})
    args = (ArgSpec((SIZE, SIZE), "float32"),) * 3
    candidates = []
    for index in range(count):
        ti, tj = TILES[index % len(TILES)]
        sch = s_tir.Schedule(tvm.IRModule({"matmul": matmul}))
        i, j, k = sch.get_loops(sch.get_sblock("c", func_name="matmul"))
        i0, i1 = sch.split(i, [None, ti])
        j0, j1 = sch.split(j, [None, tj])
        sch.reorder(i0, j0, k, i1, j1)
        sch.vectorize(j1)
        path = folder / f"candidate{index}.tar"
        tvm.compile(sch.mod, target=target).export_library(str(path))
        candidates.append(BuiltCandidate(path, "matmul", args))
    return candidates


def run(servers: int, candidates: list[BuiltCandidate], plan: TimingPlan, log_dir: Path) -> dict:
    with LoopbackRpcCluster(servers=servers, key=f"bench{servers}", log_dir=log_dir) as cluster:
        start = time.perf_counter()
        measurer = RpcMeasurer(cluster.tracker, cluster.key, plan)
        (first,) = measurer.measure(candidates[:1])
        cold = time.perf_counter() - start
        start = time.perf_counter()
        seconds = measurer.measure(candidates)
        wall = time.perf_counter() - start
        loaded_intrinsics = [
            log.name for log in cluster.server_logs() if "tensor_intrin" in log.read_text(errors="replace")
        ]
    return {
        "servers": servers,
        "cold_start_s": cold,
        "first_candidate_s": first,
        "wall_s": wall,
        "candidate_s": seconds,
        "failed": sum(1 for s in seconds if s == float("inf")),
        "server_logs_mentioning_tensor_intrin": loaded_intrinsics,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--min-repeat-ms", type=int, default=20)
    args = parser.parse_args()
    plan = TimingPlan(repeat=args.repeat, min_repeat_ms=args.min_repeat_ms)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tune-rpc-scaling-") as tmp:
        folder = Path(tmp)
        candidates = build_candidates(folder, args.candidates)
        runs = [run(n, candidates, plan, folder / f"logs{n}") for n in (1, 2)]
    assert "tvm.s_tir.tensor_intrin" not in sys.modules, "the measurer imported the tensor intrinsics"
    one, two = runs
    summary = {
        "candidates": args.candidates,
        "speedup_two_servers": one["wall_s"] / two["wall_s"],
        "cold_start_s": {"1": one["cold_start_s"], "2": two["cold_start_s"]},
    }
    print(f"{args.candidates} candidates, {plan}; load average before {load_before}, after {os.getloadavg()}")
    for r in runs:
        print(
            f"  {r['servers']} server(s): wall {r['wall_s']:.2f} s, cold start {r['cold_start_s']:.2f} s, "
            f"failed {r['failed']}"
        )
    print(f"  two servers / one: {summary['speedup_two_servers']:.2f}x faster")
    env = environment(extra={"load_average_before": load_before, "load_average_after": os.getloadavg()})
    path = write_results(RESULTS, "tune_rpc_scaling", {"environment": env, "summary": summary, "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
