"""Sparse weight GEMM on the CPU (ellpack: the GEMM over the nonzeros) against torch fp32 dense `linear`
and against our dense path (dense fp32 column panels), same process, same weights, 1 and 2 threads.

    .venv/bin/python benchmarks/sparse_gemm_cpu.py                # the issue's grid (several minutes)
    .venv/bin/python benchmarks/sparse_gemm_cpu.py --quick        # one small shape: a smoke test

For each weight shape [M, K] and sparsity: W is random Gaussian, pruned per output row by magnitude
(`compiler/pruning.py`), and stored as ellpack (`compiler/formats/ellpack.py`); torch runs
`torch.nn.functional.linear(x, W)` on the pruned weight with its nonzeros rounded to fp16 (the very
values the kernel multiplies), our dense path the same weight as dense-fp32-panel. For each token count
N the kernels are built as the compile pipeline builds a layer seeing N tokens (tensorpress.n_hint = N:
one token takes the gather schedule, up to 16 tokens 8 in the vector lanes, more 16;
`schedules/cpu/row_slot_gemm.py`), scheduled by the CPU rule and built for the artifact CPU target
(x86-64-v3). Outputs are compared first.

Threads: TVM's pool and torch.set_num_threads are set alike, to each of --threads in turn.
Timing: rounds alternate the three sides, each call after a 128 MiB buffer is rewritten (so a weight
that fits the L3, e.g. 4096 x 4096 at 80% in ellpack, 13 MB, is read from memory as in a model whose
layers do not all fit) and a short pause (idle thread pools fall asleep); a side's figure is its
fastest round (this machine is shared: the minimum is the least disturbed run), the median is kept
beside it. Ratios: torch / ours and dense / ours (> 1: ours is
faster). Fraction of copy bandwidth: the bytes a call must move (the stored weight, X, Y) per second
over this machine's copy bandwidth (torch's copy of 512 MiB, read + write), measured in the same run.
With one token the kernel built for a decode step (n_hint 16: 8 token lanes, switching to the one-token
gather when a call has N = 1) is timed too ("ours_built_for_16_ms"): what a decoder compiled by the
pipeline runs for one sequence.
Writes JSON (benchmarks/results/sparse_gemm_cpu.json) with machine, versions and git commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results" / "sparse_gemm_cpu.json"
PAUSE_S = 0.02
FLUSH_BYTES = 128 << 20  # rewritten before every timed call: no weight stays in the 32 MiB L3 from the last


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,11008x4096", help="MxK weight shapes, comma-separated")
    parser.add_argument("--sparsities", default="0.5,0.7,0.8,0.9", help="fractions of zeros, comma-separated")
    parser.add_argument("--tokens", default="1,4,16", help="token counts N, comma-separated")
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="one 512x1024 shape at 80%%, 3 rounds: a smoke test")
    parser.add_argument("--output", type=Path, default=None, help=f"results JSON (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.sparsities, args.rounds = "512x1024", "0.8", 3
        args.output = args.output or RESULTS.with_name("sparse_gemm_cpu_quick.json")
    args.output = args.output or RESULTS
    return args


def build_kernel(fmt: str, buffers, m: int, k: int, n_hint: int):
    """The weight GEMM of `fmt` for [m, k], fp32 activations, scheduled by the CPU rule and built."""
    import tvm

    from tensorpress.compiler.formats import get_weight_format
    from tensorpress.compiler.targets import parse_target
    from tensorpress.schedules.cpu.weight_gemm import WeightGemm
    from tensorpress.schedules.weight_gemm import N_HINT_ATTR, make_weight_gemm

    stage = get_weight_format(fmt).decode_stage()
    func = make_weight_gemm(stage, m, k, act_dtype="float32", buffers=buffers).with_attr(N_HINT_ATTR, n_hint)
    target = parse_target("cpu").tvm_target()
    sch = WeightGemm().apply(func, target, False)
    if sch is None:
        raise RuntimeError(f"the CPU weight-GEMM rule declined {fmt} {m}x{k}")
    return tvm.compile(sch.mod, target=target)["main"]


def set_threads(count: int) -> None:
    """TVM's thread pool and torch's, both to `count` threads."""
    import torch
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(0, count)  # 0: big cores (all of them here)
    torch.set_num_threads(count)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch
    import tvm

    from benchmarks.harness import measure_copy_bandwidth
    from tensorpress.compiler.formats import get_weight_format
    from tensorpress.compiler.pruning import prune

    flush = np.zeros(FLUSH_BYTES, np.uint8)
    copy_bw = measure_copy_bandwidth(torch.device("cpu"))
    print(f"copy bandwidth (read + write): {copy_bw / 1e9:.1f} GB/s")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    sparsities = [float(v) for v in args.sparsities.split(",")]
    tokens = [int(v) for v in args.tokens.split(",")]
    threads = [int(v) for v in args.threads.split(",")]
    ellpack, dense = get_weight_format("ellpack"), get_weight_format("dense-fp32-panel")
    print(f"{'M x K':>11} {'sparse':>6} {'N':>3} {'thr':>3} {'ours ms':>8} {'torch ms':>8} {'dense ms':>8} "
          f"{'vs torch':>8} {'vs dense':>8} {'ours bw%':>8} {'torch bw%':>9} {'rel err':>8}")  # fmt: skip
    rows = []
    dev = tvm.cpu()
    for m, k in shapes:
        w = (np.random.default_rng(m + k).standard_normal((m, k)) / k**0.5).astype(np.float32)
        dense_packed = None
        for sparsity in sparsities:
            packed = ellpack.pack(prune(w, sparsity, "magnitude"))
            w_hat = ellpack.unpack(packed)  # the pruned weight, nonzeros in fp16
            dense_packed = dense.pack(w_hat)
            w_torch = torch.from_numpy(w_hat)
            sparse_args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in packed.arrays.values()]
            dense_args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in dense_packed.arrays.values()]
            for n in tokens:
                start = time.perf_counter()
                ours_kernel = build_kernel("ellpack", packed.buffers, m, k, n)
                dense_kernel = build_kernel("dense-fp32-panel", dense_packed.buffers, m, k, n)
                build_s = time.perf_counter() - start
                x = np.random.default_rng(n).standard_normal((n, k)).astype(np.float32)
                x_t, x_tvm = torch.from_numpy(x), tvm.runtime.tensor(x, dev)
                y_ours, y_dense = (tvm.runtime.empty((n, m), "float32", dev) for _ in range(2))
                calls = {
                    "ours": partial(ours_kernel, x_tvm, *sparse_args, y_ours),
                    "torch": partial(torch.nn.functional.linear, x_t, w_torch),
                    "dense": partial(dense_kernel, x_tvm, *dense_args, y_dense),
                }
                if n == 1:  # a decoder's decode step is built for 16 tokens (token_count_hint), runs with 1
                    step_kernel = build_kernel("ellpack", packed.buffers, m, k, 16)
                    calls["ours_built_for_16"] = partial(step_kernel, x_tvm, *sparse_args, y_ours)
                with torch.no_grad():
                    expected = torch.nn.functional.linear(x_t, w_torch)
                    calls["ours"]()
                    calls["dense"]()
                    scale = float(expected.abs().max())
                    err = float((torch.from_numpy(y_ours.numpy()) - expected).abs().max()) / scale
                    dense_err = float((torch.from_numpy(y_dense.numpy()) - expected).abs().max()) / scale
                    for count in threads:
                        set_threads(count)
                        times: dict[str, list[float]] = {side: [] for side in calls}
                        for _ in range(args.rounds):
                            for side, call in calls.items():
                                flush.fill((int(flush[0]) + 1) % 256)
                                time.sleep(PAUSE_S)
                                t0 = time.perf_counter()
                                call()
                                times[side].append(time.perf_counter() - t0)
                        best = {side: min(t) for side, t in times.items()}
                        moved = 4 * n * (k + m)  # X and Y
                        row = {
                            "m": m, "k": k, "sparsity": sparsity, "n": n, "threads": count,
                            "ours_ms": best["ours"] * 1e3, "torch_ms": best["torch"] * 1e3,
                            "dense_ms": best["dense"] * 1e3,
                            **({"ours_built_for_16_ms": best["ours_built_for_16"] * 1e3} if n == 1 else {}),
                            "speedup_vs_torch": best["torch"] / best["ours"],
                            "speedup_vs_dense": best["dense"] / best["ours"],
                            **{f"{side}_median_ms": statistics.median(t) * 1e3 for side, t in times.items()},
                            "ours_fraction_of_copy_bandwidth": (packed.nbytes + moved) / best["ours"] / copy_bw,
                            "torch_fraction_of_copy_bandwidth": (4 * m * k + moved) / best["torch"] / copy_bw,
                            "dense_fraction_of_copy_bandwidth": (dense_packed.nbytes + moved) / best["dense"] / copy_bw,
                            "ours_weight_bytes": packed.nbytes, "dense_weight_bytes": dense_packed.nbytes,
                            "rel_error": err, "dense_rel_error": dense_err, "build_seconds": build_s,
                        }  # fmt: skip
                        rows.append(row)
                        print(
                            f"{f'{m}x{k}':>11} {sparsity:6.0%} {n:3d} {count:3d} {row['ours_ms']:8.2f} "
                            f"{row['torch_ms']:8.2f} {row['dense_ms']:8.2f} {row['speedup_vs_torch']:7.2f}x "
                            f"{row['speedup_vs_dense']:7.2f}x {100 * row['ours_fraction_of_copy_bandwidth']:7.1f}% "
                            f"{100 * row['torch_fraction_of_copy_bandwidth']:8.1f}% {err:8.1e}",
                            flush=True,
                        )
    result = {
        "benchmark": "sparse_gemm_cpu",
        "what": "ellpack weight GEMM over the nonzeros (tensorpress CPU schedule, llvm x86-64-v3) vs "
        "torch.nn.functional.linear fp32 dense and vs tensorpress dense-fp32-panel, magnitude-pruned weights",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "versions": {"torch": torch.__version__, "tvm": tvm.__version__, "numpy": np.__version__},
        "commit": _git_commit(),
        "timing": f"fastest of {args.rounds} alternating rounds",
        "copy_bandwidth_bytes_per_s": copy_bw,
        "load_average_after": os.getloadavg(),
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"results: {args.output}")
    return 0


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    except OSError:
        return None
    return out.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
