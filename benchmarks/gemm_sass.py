"""Print what ptxas and the SASS say about every shipped tile config of the weight GEMM (no GPU needed).

    .venv/bin/python benchmarks/gemm_sass.py [--m 4096 --k 4096] [--arch sm_80 --arch sm_90a]
    .venv/bin/python benchmarks/gemm_sass.py --format fp6 --format fp5 --format fp4 --arch sm_90a
    .venv/bin/python benchmarks/gemm_sass.py --decode-only --format fp6 --format fp5 --format fp4
    .venv/bin/python benchmarks/gemm_sass.py --format tiled-csl --format bitmap --sparsity 0.8 --arch sm_90a
    .venv/bin/python benchmarks/gemm_sass.py --format bitmap --sparsity 0.8 --w-path fragment --split-k 1

One row per (format, config, arch, kernel): registers, spill and stack bytes, shared memory (static +
dynamic), and the count of HMMA (mma.sync), LDSM (ldmatrix) and LDGSTS (cp.async) instructions in
the listing. Then, for the GEMM kernel, the steady state: what one warp executes per K tile of the
main loop (inner loops multiplied by their trip counts, see `sass_cost.steady_state`), as HMMA,
integer ops, fp16 ops, BAR, LDS, STS, and thread-instructions per weight. That last figure against
the issue budget (`sass_cost.weight_budget`) says whether the decode keeps the kernel memory-bound:
at full HBM bandwidth an H100 SM receives about 14 bytes per clock, i.e. 14·8/b weights of b bits,
and issues 4 × 32 thread-instructions per clock, so it can spend at most ~1.15·b thread-instructions
per weight (fp16: 18.5, FP6: 6.9, FP5: 5.8, FP4: 4.6) on everything (copy, decode, mma, loop); "ok"
marks the rows within it. A sparse format (bitmap, bitmap-eXmY, tiled-csl) is built for a weight pruned
at random to --sparsity and its budget uses the bits it really stores per weight (tiled-csl at 80%: 32
bits a nonzero + offsets, about 6.5 bits, a budget of about 7.5).

Scatter formats (a stage with a tile scatter: tiled-csl, bitmap, bitmap-eXmY) run loops whose trips
follow the data, so their steady state is weighted (`sass_cost.scatter_steady_state`): each loop of the
main loop counts as often as it runs per K tile for one warp, and a warp runs a loop as often as its
busiest lane. `scatter_trips` deals the packed weight's tiles to the config's threads as the template
does (`tile_scatter.Dealing`) and takes, over every CTA tile of the weight, the mean of: the group loop's
trips (a vector load of words each), per bitmap word the busiest lane's set bits rounded up to whole
chunks (`SetBits.chunk`: the loop over a word's set bits runs that often, over its STS per trip: one
per bit of a chunk, more when nvcc unrolls it), and the zero-fill's 16-byte stores.
The phase loop (fill | scatter, a BAR in it) counts once: its phases are branches. Forward branches
count as taken both ways (an upper bound: nvcc's remainder code after an unrolled loop counts at every
trip of the loop around it). Checked by hand on a small listing (tests/schedules/verification/
test_sass_cost.py). n64m64k64's W tile (64 x 64) has half as many tile rows (or rows of runs) as its 128
threads: half its warps decode, and the other half's branches around the decode, counted as taken, raise
its figure (about 1.5x the other tiles' for the scatter, 2x for runs).

--decode-only compiles just an FPx decode, the way one lane of an mma B fragment would run it (8
weights of a 32-wide group per row: one word of plane4, half a word of plane2), per element and as
half2 pairs (`FPxDecode.fp16_bits(pair=True)`), and prints instructions per weight: what a template
that decodes into registers instead of one element per thread would pay.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import replace

from tensorpress.schedules.tensorcore.tile_config import SHIPPED_TILES
from tensorpress.schedules.verification.sass_cost import (
    INTEGER_OPS,
    ScatterTrips,
    parse_listing,
    scatter_steady_state,
    steady_state,
    summarize,
    weight_budget,
)


def format_bits(fmt: str) -> int:
    from tensorpress.compiler.formats import get_weight_format

    return get_weight_format(fmt).code_bits()


def sparse_weight(fmt: str, m: int, k: int, sparsity: float):
    """(the packed weight or None, bits stored per weight) of a random [m, k] weight pruned to `sparsity`
    in the sparse format `fmt`; (None, code bits) for the formats whose buffers follow from the shape."""
    import numpy as np

    from tensorpress.compiler.formats import get_weight_format
    from tensorpress.compiler.pruning import prune

    weight_format = get_weight_format(fmt)
    if not weight_format.sparse:
        return None, weight_format.code_bits()
    w = prune(np.random.default_rng(0).standard_normal((m, k)).astype(np.float32), sparsity)
    packed = weight_format.pack(w)
    return packed, packed.nbytes * 8 / (m * k)


def scatter_trips(scatter, arrays: list, m: int, k: int, config) -> ScatterTrips:
    """How often a tile scatter's loops run per K tile and warp (`sass_cost.ScatterTrips`) for the packed
    weight `arrays` (its stored arrays in order), dealt to the config's threads as the template deals
    them (`tile_scatter.Dealing`); means over every CTA tile (block_m x block_k) of the weight."""
    import numpy as np

    from tensorpress.schedules.tile_scatter import ZERO_LANES, Dealing, ScatterRegion

    region = ScatterRegion(0, 0, config.block_m, config.block_k, m, k)
    deal = Dealing(scatter, region, config.threads)
    vec = scatter.vector
    cta_m, cta_k = np.meshgrid(np.arange(m // config.block_m), np.arange(-(-k // config.block_k)), indexing="ij")
    flat_words = np.asarray(arrays[scatter.words]).reshape(-1)
    bit_counts = None
    if scatter.set_bits is not None:  # a word's loop issues its STS a chunk at a time: its trips x chunk
        chunk = scatter.set_bits.chunk
        bit_counts = -(-np.bitwise_count(flat_words).astype(np.int64) // chunk) * chunk

    def tile(j: int):  # (tile row, tile col, first word, groups) of tile j of every CTA tile
        tile_row = cta_m * (config.block_m // scatter.tile_rows) + j // deal.along_k
        tile_col = cta_k * max(1, config.block_k // scatter.tile_cols) + j % deal.along_k
        inside = tile_col < deal.tiles_k
        first, end = scatter.word_range(arrays, tile_row, np.minimum(tile_col, deal.tiles_k - 1))
        return np.asarray(first), np.where(inside, (np.asarray(end) - first) // vec, 0)

    groups_total, elements_total = 0.0, 0.0
    for warp in range(config.warps):
        threads = range(warp * 32, warp * 32 + 32)
        steps = max(len(deal.tiles_of(t)) for t in threads)
        for step in range(steps):
            lanes = [(deal.lane_of(t), tile(deal.tiles_of(t)[step])) for t in threads if step < len(deal.tiles_of(t))]
            counts = [np.maximum(0, -(-(groups - lane) // deal.per_tile)) for lane, (_, groups) in lanes]
            most = np.max(counts, axis=0)
            groups_total += most.mean()
            if bit_counts is None:
                continue
            for q in range(int(most.max())):
                for e in range(vec):
                    busiest = np.zeros(cta_m.shape)
                    for lane, (first, groups) in lanes:
                        group = lane + q * deal.per_tile
                        word = np.minimum(first + group * vec + e, flat_words.size - 1)
                        busiest = np.maximum(busiest, np.where(group < groups, bit_counts[word], 0))
                    elements_total += busiest.mean() / vec
    fill = config.block_m * config.block_k // ZERO_LANES // config.threads
    words = None if bit_counts is None else elements_total / config.warps
    return ScatterTrips(groups_total / config.warps, words, fill, vec)


def forced_w_path(stage, path: str):
    """`stage`, or a copy whose choice between fragment decode and the tile scatter is `path` at any density
    (the template still takes the scatter where the stage's fragment unit does not divide block_k)."""
    import copy

    if path == "stage":
        return stage
    forced = copy.copy(stage)
    forced.fragment_decode_preferred = lambda stored, m, k: path == "fragment"
    return forced


def decode_only_kernel(fmt: str, pair: bool, m: int = 1024, k: int = 1024, rows_per_thread: int = 8):
    """A CUDA PrimFunc: thread (group g, lane t) decodes, for `rows_per_thread` rows, the 8 codes
    k = 32g + 2t + 8j + h (j < 4, h < 2) into fp16 bit patterns, per element or as 4 half2 pairs."""
    from tvm import s_tir, te

    from tensorpress.compiler.formats import decode_stage

    stage = decode_stage(fmt)
    planes = [te.placeholder(b.shape, b.dtype, name=b.name) for b in stage.stored_buffers(m, k)[:-1]]
    if pair:
        out = te.compute(
            (m, k // 32, 4, 4), lambda r, g, t, j: stage.fp16_bits(planes, r, 32 * g + 2 * t + 8 * j, pair=True)
        )
    else:
        out = te.compute(
            (m, k // 32, 4, 4, 2),
            lambda r, g, t, j, h: stage.fp16_bits(planes, r, 32 * g + 2 * t + 8 * j + h).astype("uint16"),
        )
    sch = s_tir.Schedule(te.create_prim_func([*planes, out]))
    block = sch.get_sblock("compute")
    r, g, t, *inner = sch.get_loops(block)
    r_outer, r_inner = sch.split(r, [None, rows_per_thread])
    sch.reorder(r_outer, g, t, r_inner, *inner)
    bx, tx = sch.split(sch.fuse(r_outer, g, t), [None, 128])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    for loop in (r_inner, *inner):
        sch.unroll(loop)
    return sch.mod["main"], rows_per_thread * 8


def decode_only_report(formats: list[str], arch: str) -> None:
    import tvm

    from tensorpress.compiler.formats import get_weight_format
    from tensorpress.compiler.formats.fpx import FPxFormat
    from tensorpress.schedules.verification import cuda_inspection as inspection

    functions, weights = {}, {}
    for fmt in formats:
        spec = get_weight_format(fmt)
        stage = spec.stage_name if isinstance(spec, FPxFormat) else fmt
        for pair in (False, True):
            func, per_thread = decode_only_kernel(stage, pair)
            symbol = f"{stage}_{'pair' if pair else 'element'}"
            functions[symbol], weights[symbol] = func.with_attr("global_symbol", symbol), per_thread
    module = tvm.IRModule(functions)
    cubin, _ = inspection.compile_cubin(inspection.cuda_source(module, arch), arch)
    listing = inspection.parse_sass(inspection.disassemble(cubin))
    print("| decode | arch | INT / weight | loads / weight | all / weight (incl. stores, setup) |")
    print("|---|---|---|---|---|")
    for name in sorted(listing):
        symbol = name.split("_kernel")[0]
        ops, n = listing[name], weights[symbol]
        ints = sum(v for op, v in ops.items() if op in INTEGER_OPS)
        loads = sum(v for op, v in ops.items() if op in ("LDG", "LDS"))
        total = sum(v for op, v in ops.items() if op not in ("NOP", "EXIT", "BRA"))
        print(f"| {symbol} | {arch} | {ints / n:.2f} | {loads / n:.2f} | {total / n:.2f} |")


def main(argv: list[str] | None = None) -> int:
    import tvm

    from tensorpress.compiler.formats import decode_stage
    from tensorpress.schedules.tensorcore.intrinsics import cuda_intrinsics
    from tensorpress.schedules.tensorcore.template import builds_w_by_scatter, schedule_weight_gemm
    from tensorpress.schedules.verification import cuda_inspection as inspection
    from tensorpress.schedules.weight_gemm import make_weight_gemm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--arch", action="append", help="default: sm_80 and sm_90a")
    parser.add_argument("--format", action="append", help="weight formats (default: dense-fp16)")
    parser.add_argument("--split-k", type=int, action="append", help="split_k values (default: 1 and 2)")
    parser.add_argument("--decode-only", action="store_true", help="FPx decode cost per element vs per pair")
    parser.add_argument("--sparsity", type=float, default=0.8, help="sparse formats: the weight's zeros")
    parser.add_argument(
        "--w-path",
        choices=["stage", "fragment", "scatter"],
        default="stage",
        help="a stage offering fragment decode and a tile scatter (bitmap): the one its density picks, or either",
    )
    args = parser.parse_args(argv)
    if args.decode_only:
        for arch in args.arch or ["sm_90a"]:
            decode_only_report(args.format or ["fp6", "fp5", "fp4"], arch)
        return 0
    formats = args.format or ["dense-fp16"]
    configs = [replace(t, split_k=s) for t in SHIPPED_TILES for s in (args.split_k or [1, 2])]
    functions, labels, bits, trips = {}, {}, {}, {}
    for fmt in formats:
        packed, bits[fmt] = sparse_weight(fmt, args.m, args.k, args.sparsity)
        buffers = None if packed is None else packed.buffers
        stage = forced_w_path(decode_stage(fmt), args.w_path)
        scatter = stage.tile_scatter
        for config in configs:
            func = make_weight_gemm(stage, args.m, args.k, with_bias=True, buffers=buffers)
            symbol = f"{fmt.replace('-', '_')}_{config.label()}"
            main_func = schedule_weight_gemm(func, config, cuda_intrinsics()).mod["main"]
            functions[symbol] = main_func.with_attr("global_symbol", symbol)
            labels[symbol] = (fmt, config)
            if scatter is not None and packed is not None and builds_w_by_scatter(func, config):
                trips[symbol] = scatter_trips(scatter, list(packed.arrays.values()), args.m, args.k, config)
    module = tvm.IRModule(functions)
    print("| format | config | arch | kernel | regs | spill B | stack B | smem B | HMMA | LDSM | LDGSTS |"
          " per K tile & warp: HMMA | INT | INT/HMMA | FP16 | BAR | LDS | STS | instr/weight (budget) |")  # fmt: skip
    print("|---" * 19 + "|")
    for arch in args.arch or ["sm_80", "sm_90a"]:
        cubin, log = inspection.compile_cubin(inspection.cuda_source(module, arch), arch)
        ptxas, listing = inspection.parse_ptxas(log), inspection.disassemble(cubin)
        sass, instructions = inspection.parse_sass(listing), parse_listing(listing)
        dyn = inspection.dynamic_shared_bytes(module, arch)
        for name in sorted(ptxas):
            symbol, _, rest = name.partition("_kernel")
            fmt, config = labels[symbol]
            info, ops = ptxas[name], sass.get(name, Counter())
            row = (
                f"| {fmt} | {config.label()} | {arch} | {'reduce' if rest else 'gemm'} | {info['registers']} | "
                f"{info['spill_stores'] + info['spill_loads']} | {info['stack']} | {info['smem'] + dyn.get(name, 0)} | "
                f"{ops['HMMA']} | {ops['LDSM']} | {ops['LDGSTS']} |"
            )
            per_thread = config.block_m * config.block_k // config.threads
            if rest:
                counts = None
            elif symbol in trips:
                counts = scatter_steady_state(instructions[name], trips[symbol])
            else:
                counts = steady_state(instructions[name], per_thread)
            if counts is None:
                print(row + " | | | | | | | |")
                continue
            s = summarize(counts, config)
            budget = weight_budget(bits[fmt])
            verdict = "ok" if s["instructions_per_weight"] <= budget else "over"
            print(
                f"{row} {s['HMMA']:.0f} | {s['INT']:.0f} | {s['int_per_hmma']:.1f} | {s['FP16']:.0f} | "
                f"{s['BAR']:.0f} | {s['LDS']:.0f} | {s['STS']:.0f} | "
                f"{s['instructions_per_weight']:.2f} ({budget:.2f}, {verdict}) |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
