"""Print what ptxas and the SASS say about every shipped tile config of the weight GEMM (no GPU needed).

    .venv/bin/python benchmarks/gemm_sass.py [--m 4096 --k 4096] [--arch sm_80 --arch sm_90a]

One row per (config, arch, kernel): registers, spill and stack bytes, shared memory (static +
dynamic), and the count of HMMA (mma.sync), LDSM (ldmatrix) and LDGSTS (cp.async) instructions.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from tensorpress.schedules.tensorcore.config import SHIPPED_TILES
from tensorpress.schedules.tensorcore.inspection import inspect_cuda
from tensorpress.schedules.tensorcore.intrinsics import cuda_intrinsics
from tensorpress.schedules.tensorcore.template import schedule_weight_gemm
from tensorpress.schedules.weight_gemm import get_decode_stage, make_weight_gemm


def main(argv: list[str] | None = None) -> int:
    import tvm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--arch", action="append", help="default: sm_80 and sm_90a")
    args = parser.parse_args(argv)
    configs = [replace(t, split_k=s) for t in SHIPPED_TILES for s in (1, 2)]
    functions = {}
    for config in configs:
        func = make_weight_gemm(get_decode_stage("dense-fp16"), args.m, args.k, with_bias=True)
        main_func = schedule_weight_gemm(func, config, cuda_intrinsics()).mod["main"]
        functions[config.label()] = main_func.with_attr("global_symbol", config.label())
    module = tvm.IRModule(functions)
    print("| config | arch | kernel | regs | spill B | stack B | smem B | HMMA | LDSM | LDGSTS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arch in args.arch or ["sm_80", "sm_90a"]:
        for r in sorted(inspect_cuda(module, arch), key=lambda r: r.name):
            config, _, rest = r.name.partition("_kernel")
            role = "reduce" if rest else "gemm"
            print(
                f"| {config} | {arch} | {role} | {r.registers} | {r.spill_bytes} | {r.stack_bytes} | "
                f"{r.shared_bytes} | {r.sass['HMMA']} | {r.sass['LDSM']} | {r.sass['LDGSTS']} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
