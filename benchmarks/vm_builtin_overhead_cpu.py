"""What the Relax VM's shape builtins really cost per call, without the profiler's own per-call cost.

    .venv/bin/python benchmarks/vm_builtin_overhead_cpu.py [--reshapes 400]

MiniLM's VM profile (benchmarks/minilm_profile_cpu.py) lists ~820 builtin calls per pass at 1x128
(vm.builtin.make_shape x274, null_value x273, reshape x134, alloc_tensor x121) at ~1.1 ms, but the
profiler times each call through a Python callback. Here a Relax function of R reshapes of a tensor
with a symbolic row count (each reshape lowers to make_shape + reshape + null_value, as in MiniLM) is
built with TVM's default pipeline and called in a loop, beside the same function with no reshape:
(time with R - time with 0) / R is one reshape's three builtin calls. Fastest of 20 batches of 200 calls.
Writes JSON (benchmarks/results/vm_builtin_overhead_cpu.json) with the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results" / "vm_builtin_overhead_cpu.json"


def reshape_chain(reshapes: int):
    """main(x: [n, 384]) reshaping x `reshapes` times between [n, 12, 32] and [n, 384]."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([n, 384], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = x
            for i in range(reshapes):
                y = bb.emit(relax.op.reshape(y, [n, 12, 32] if i % 2 == 0 else [n, 384]))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def seconds_per_call(mod) -> tuple[float, dict[str, int]]:
    """Fastest seconds per call of `mod`'s main on a [128, 384] tensor; its builtin calls by name."""
    import numpy as np
    import tvm
    from tvm import relax

    executable = tvm.compile(mod, target="llvm")
    text = executable.as_text()
    builtins = {name: text.count(f"vm.builtin.{name} ") for name in ("make_shape", "reshape", "null_value")}
    main = relax.VirtualMachine(executable, tvm.cpu())["main"]
    x = tvm.runtime.tensor(np.zeros((128, 384), "float32"))
    main(x)
    best = float("inf")
    for _ in range(20):
        start = time.perf_counter()
        for _ in range(200):
            main(x)
        best = min(best, (time.perf_counter() - start) / 200)
    return best, builtins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reshapes", type=int, default=400)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from benchmarks.harness import environment, write_json

    load_before = os.getloadavg()
    empty, _ = seconds_per_call(reshape_chain(0))
    chain, builtins = seconds_per_call(reshape_chain(args.reshapes))
    per_reshape = (chain - empty) / args.reshapes
    print(f"builtin calls in the chain: {builtins}")
    print(f"one reshape (make_shape + reshape + null_value): {per_reshape * 1e9:.0f} ns")
    payload = {
        "benchmark": "vm_builtin_overhead_cpu",
        "command": " ".join(["benchmarks/vm_builtin_overhead_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": environment(extra={"load_average_before": load_before, "load_average_after": os.getloadavg()}),
        "reshapes": args.reshapes,
        "builtin_calls": builtins,
        "call_without_reshapes_us": empty * 1e6,
        "call_with_reshapes_us": chain * 1e6,
        "ns_per_reshape": per_reshape * 1e9,
    }
    write_json(args.output, payload)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
