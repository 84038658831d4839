"""CPU decode attention over the paged KV cache, per KV format, against torch's scaled_dot_product_attention.

For each context length T (1k / 8k / 32k), batch B (1, 8) and GQA group G (4, 8) at head_dim 128 (--head-dim; 32 query
heads over 8 or 4 kv heads, one layer), one decode step: B query tokens, each attending to its own T cached
tokens. Side by side in one process, on the same machine state:

    ours  paged_attention "decode" built for llvm by the project's rules (`schedules/kv_attention_cpu.py`)
          over pages of 16 tokens in each KV format (--formats: fp32 = the full-precision cache of an fp32
          model, fp16, int8, int4, int2-kitty, int2-oscar); queries and outputs fp32. int2-kitty's cache is what
          the runtime leaves at that length: the first 2 pages (sink 32) and the last 8 to 15 (window 128 and
          the group still waiting) full precision (fp32), the rest in 2-bit pages of 128 tokens (groups of 8);
          int2-oscar's the same with 2-bit pages of 16 tokens (its rotations are the decoder's, outside the
          attention: the kernel reads rotated rows like any others)
    torch F.scaled_dot_product_attention(q, K, V, enable_gqa=True) on dense fp32 [B, KVH, T, D] K and V
          (what a framework without a paged or quantised cache does; fp32, as CPU models run)

    fp32_without_page_reads   our fp32 kernel with its page read replaced by an index expression (no
          memory access, but the same gathers into the task's key and value tiles): what the kernel costs
          when no cache byte is read; a format's time above it is what reading and decoding its pages adds

Each is timed as the median of several calls taken in turns (run r of every implementation before run
r + 1 of any: the machine may be shared, and its load then falls on all alike; host clock; the cache is
far larger than the L3, so it streams from DRAM). Reported per case: milliseconds, the speedup over our
fp32 cache and over torch, the KV bytes each call reads (bytes per token x T x B: codes and per-row
metadata), and the fraction of the machine's copy bandwidth (torch's multi-threaded copy, measured in the
same run, read + write counted) that those bytes over the time reach, and the GFLOP/s of the attention's
arithmetic (4·H·D FLOPs per position: q·k and p·v; the same for every format). Data are random (the time does not
depend on the values); before timing, each format's output at 1k context is checked against torch's SDPA
over that format's dequantised cache.

    .venv/bin/python benchmarks/kv_attention_cpu.py              # the full grid (a few minutes)
    .venv/bin/python benchmarks/kv_attention_cpu.py --quick      # 1k and 8k, batch 1, fewer runs
    .venv/bin/python benchmarks/kv_attention_cpu.py --target cpu:x86-64-v4   # every kernel of ours, fp32
                                                                 # included, built for AVX-512 (default: cpu)

Writes JSON (default benchmarks/results/kv_attention_cpu.json; --quick: kv_attention_cpu_quick.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAD_DIM = 128
HEADS = 32
PAGE = 16
FORMAT_NAMES = {
    "fp32": "fp32",
    "fp16": "fp16",
    "int8": "int8",
    "int4": "int4",
    "int2-kitty": "int2-kitty",
    "int2-oscar": "int2-oscar",
    "int2-kitty-q8": "int2-kitty",  # -q8: int8_query on (q·k as int8 x 2-bit dot products); without: off
    "int2-oscar-q8": "int2-oscar",
}
INT8_QUERY = "-q8"
NO_READ = "fp32_without_page_reads"  # the attention's arithmetic and scratch alone: where the time goes
SDPA = "torch_sdpa_fp32"


class WithoutPageReads:
    """A KV layout whose page read is an index expression (no memory access): the kernel built over it
    does all the attention's work (the tile gathers' index math and stores included) but read the cache."""

    def __init__(self, inner):
        self.inner = inner

    def cache_tensors(self, *args):
        return self.inner.cache_tensors(*args)

    def append_func(self, *args):
        return self.inner.append_func(*args)

    def read(self, cache, layer, page, kv, head, row, d, dtype):
        from tvm import tirx

        return tirx.Cast(dtype, tirx.floormod(row + d, 3))


def build_decode(fmt, heads: int, kv_heads: int, target_name: str = "cpu"):
    """The decode attention of `fmt` (query dtype fp32), scheduled by the project's CPU rules, built for
    `target_name` (`tensorpress compile --target`'s names: cpu, cpu:x86-64-v4, ...)."""
    import tvm
    from tvm.s_tir import dlight as dl

    from tensorpress.compiler.targets import parse_target
    from tensorpress.schedules.kv_attention import kv_attention_rules, paged_attention_func

    spec = parse_target(target_name)
    if spec.kind != "cpu":
        raise ValueError(f"this benchmark builds CPU kernels, not {target_name!r}")
    target = spec.tvm_target()  # the target `tensorpress compile --target <target_name>` builds for
    with target:  # defined under it, as the compiler imports a decoder: the CPU's chunks (`chunk_tokens`)
        func = paged_attention_func(fmt, heads, kv_heads, HEAD_DIM, PAGE, "float32", "decode")
        mod = dl.ApplyDefaultSchedule(*kv_attention_rules())(
            tvm.IRModule({"decode": func.with_attr("global_symbol", "decode")})
        )
        return tvm.compile(mod, target=target)["decode"]


def random_cache(fmt, kv_heads: int, pages: int, rng):
    """The format's cache tensors for `pages` pages of one layer, filled with random stored values: rows of
    the full-precision caches ~ N(0, 1); quantised codes uniform, min and scale as N(0, 1) rows would give."""
    import numpy as np

    arrays = []
    for t in fmt.cache_tensors(1, kv_heads, PAGE, HEAD_DIM, "float32"):
        shape = [pages if d == "num_pages" else int(d) for d in t.shape]
        dtype = np.dtype(t.dtype)
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            arrays.append(
                rng.integers(info.min + (dtype.kind == "i"), info.max, size=shape, dtype=dtype, endpoint=True)
            )
        elif t.name in ("kv_scales",):
            arrays.append(rng.uniform(0.01, 0.03, size=shape).astype(dtype))  # absmax / 127 of N(0, 1) rows
        elif t.name == "kv_min_scale":
            params = np.empty(shape, dtype)
            params[..., 0] = rng.uniform(-3.0, -2.0, size=shape[:-1])  # min
            params[..., 1] = rng.uniform(0.3, 0.4, size=shape[:-1])  # (max - min) / 15
            arrays.append(params)
        else:
            arrays.append(rng.standard_normal(size=shape, dtype=np.float32).astype(dtype))
    return arrays


def dequantised_dense(fmt, cache, batch: int, context: int, kv_heads: int):
    """K, V [B, KVH, T, D] float32 of a cache whose sequence b owns pages b*T/PS .. (b+1)*T/PS - 1."""
    import numpy as np

    per_seq = context // PAGE
    flat = [a[0].reshape(batch * per_seq * 2 * kv_heads * PAGE, *a.shape[5:]) for a in cache]  # rows, in order
    dense = fmt.dequantize(flat, "float32").reshape(batch, per_seq, 2, kv_heads, PAGE, HEAD_DIM)
    kv = dense.transpose(2, 0, 3, 1, 4, 5).reshape(2, batch, kv_heads, context, HEAD_DIM)
    return np.ascontiguousarray(kv[0]), np.ascontiguousarray(kv[1])


def main() -> None:
    global HEAD_DIM  # --head-dim
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--formats", nargs="+", default=list(FORMAT_NAMES), choices=list(FORMAT_NAMES))
    parser.add_argument(
        "--target",
        default="cpu",
        help="CPU target every kernel of ours is built for, fp32 included (cpu = x86-64-v3, cpu:x86-64-v4)",
    )
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM, help="channels a head (Llama 7B's: 128)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="1k and 8k context, batch 1, 3 runs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.contexts, args.batches, args.runs = [1024, 8192], [1], 3
    HEAD_DIM = args.head_dim  # read by the builders and the caches above
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"kv_attention_cpu{'_quick' if args.quick else ''}.json")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import numpy as np
    import torch
    import tvm

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from harness import environment, measure_copy_bandwidth, write_json

    from tensorpress.compiler.formats import get_kv_cache_format

    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()  # other jobs on the machine: their load falls on every row alike
    copy_bandwidth = measure_copy_bandwidth(torch.device("cpu"))
    print(f"copy bandwidth {copy_bandwidth / 1e9:.1f} GB/s (read + write), {args.threads} threads")
    formats = {label: get_kv_cache_format(FORMAT_NAMES[label]) for label in args.formats}
    formats = {  # int2-*: the plain fp q·k (--no-kv-int8-query); int2-*-q8: the integer q·k (the CPU default)
        label: fmt.with_options(int8_query=label.endswith(INT8_QUERY)) if hasattr(fmt, "int8_query") else fmt
        for label, fmt in formats.items()
    }
    rng = np.random.default_rng(0)
    records = []
    for group in args.groups:
        kv_heads = HEADS // group
        kernels = {label: build_decode(fmt, HEADS, kv_heads, args.target) for label, fmt in formats.items()}
        if "fp32" in formats:
            kernels[NO_READ] = build_decode(WithoutPageReads(formats["fp32"]), HEADS, kv_heads, args.target)
        for label, fmt in formats.items():  # each kernel against SDPA over its dequantised cache, small case
            error = check_against_sdpa(fmt, kernels[label], kv_heads, rng)
            print(f"group {group} {label}: max |ours - SDPA| = {error:.2e} (1k context, batch 2)")
            # -q8 rounds q (or q·a) to int8 on quantised rows: its own reference is in the tests
            assert error < (5e-2 if label.endswith(INT8_QUERY) else 1e-4), (
                f"{label} disagrees with torch SDPA ({error})"
            )
        for context in args.contexts:
            for batch in args.batches:
                records.append(run_case(formats, kernels, batch, context, kv_heads, rng, args, copy_bandwidth))

    payload = {
        "benchmark": "kv_attention_cpu",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "head_dim": HEAD_DIM,
        "query_heads": HEADS,
        "page_size": PAGE,
        "threads": args.threads,
        "target": args.target,
        "copy_bandwidth_bytes_per_s": copy_bandwidth,
        "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "environment": environment(extra={"tvm": tvm.__version__, "cpu_count": os.cpu_count()}),
        "records": records,
    }
    write_json(out, payload)
    print(f"wrote {out}")


def _inputs(fmt, batch, context, kv_heads, rng):
    """(cache, q, positions, seq_slot, block_table, KV bytes one call reads)."""
    import kv_page_granular
    import numpy as np

    per_seq = context // PAGE
    q = rng.standard_normal((batch, HEADS, HEAD_DIM), dtype=np.float32)
    positions = np.full(batch, context - 1, np.int32)
    seq_slot = np.arange(batch, dtype=np.int32)
    if hasattr(fmt, "quantised_tensors"):  # page-granular: full-precision sink and window, 2-bit pages
        cache, block_table, kv_bytes = kv_page_granular.random_cache(
            fmt, batch, context, kv_heads, HEAD_DIM, PAGE, rng, "float32"
        )
        return cache, q, positions, seq_slot, block_table, kv_bytes
    cache = random_cache(fmt, kv_heads, batch * per_seq, rng)
    block_table = np.arange(batch * per_seq, dtype=np.int32).reshape(batch, per_seq)
    kv_bytes = fmt.bytes_per_token(1, kv_heads, HEAD_DIM, "float32") * context * batch
    return cache, q, positions, seq_slot, block_table, kv_bytes


def _call(kernel, cache, q, positions, seq_slot, block_table):
    import tvm

    args = [tvm.runtime.tensor(a) for a in (q, *cache, positions, seq_slot, block_table)]
    out = tvm.runtime.empty(q.shape, "float32")
    return lambda: kernel(*args, 0, out), out


def _sdpa(q, k, v):
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True).squeeze(2)


def check_against_sdpa(fmt, kernel, kv_heads, rng) -> float:
    """max |ours - SDPA over the dequantised cache| at 1k context, batch 2."""
    import numpy as np
    import torch

    batch, context = 2, 1024
    cache, q, positions, seq_slot, block_table, _ = _inputs(fmt, batch, context, kv_heads, rng)
    import kv_page_granular

    if hasattr(fmt, "quantised_tensors"):  # page-granular: quantised from dense rows by the numpy reference
        k, v = (rng.standard_normal((batch, kv_heads, context, HEAD_DIM), dtype=np.float32) for _ in range(2))
        cache, block_table, k, v = kv_page_granular.from_dense(fmt, k, v, PAGE, "float32")
    run, out = _call(kernel, cache, q, positions, seq_slot, block_table)
    run()
    if not hasattr(fmt, "quantised_tensors"):
        k, v = dequantised_dense(fmt, cache, batch, context, kv_heads)
    expected = _sdpa(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v)).numpy()
    return float(abs(out.numpy() - expected).max())


def run_case(formats, kernels, batch, context, kv_heads, rng, args, copy_bandwidth) -> dict:
    """One (T, B, G): every implementation's inputs built first, then timed in turns (run r of each before
    run r + 1 of any), so that a shared machine's load falls on all of them alike."""
    import numpy as np
    import torch

    group = HEADS // kv_heads
    record: dict = {"context": context, "batch": batch, "group": group, "kv_heads": kv_heads, "results": {}}
    calls, kv_bytes = {}, {}
    for label, fmt in formats.items():
        cache, q, positions, seq_slot, block_table, kv_bytes[label] = _inputs(fmt, batch, context, kv_heads, rng)
        calls[label], _ = _call(kernels[label], cache, q, positions, seq_slot, block_table)
        if label == "fp32":  # the same kernel without its page reads, over the same (unread) cache
            calls[NO_READ], _ = _call(kernels[NO_READ], cache, q, positions, seq_slot, block_table)
            kv_bytes[NO_READ] = 0
        del cache
    k, v = (
        torch.from_numpy(rng.standard_normal((batch, kv_heads, context, HEAD_DIM), dtype=np.float32)) for _ in range(2)
    )
    q_torch = torch.from_numpy(rng.standard_normal((batch, HEADS, HEAD_DIM), dtype=np.float32))
    calls[SDPA] = lambda: _sdpa(q_torch, k, v)
    kv_bytes[SDPA] = 2 * kv_heads * HEAD_DIM * 4 * context * batch
    with torch.inference_mode():
        timings = time_in_turns(calls, args.runs, max_seconds=60)
    for label, timing in timings.items():
        record["results"][label] = {
            **timing,
            "kv_bytes": kv_bytes[label],
            "bytes_per_token_per_layer": kv_bytes[label] // (context * batch),
        }
    base = record["results"].get("fp32", {}).get("median_ms")
    torch_ms = record["results"][SDPA]["median_ms"]
    flops = 4 * HEADS * HEAD_DIM * context * batch  # q·k and p·v: 2 multiply-adds per head, position, channel
    for r in record["results"].values():
        r["fraction_of_copy_bandwidth"] = r["kv_bytes"] / (r["median_ms"] * 1e-3) / copy_bandwidth
        r["gflop_per_s"] = flops / (r["median_ms"] * 1e-3) / 1e9
        r["speedup_vs_our_fp32"] = base / r["median_ms"] if base else None
        r["speedup_vs_torch_sdpa"] = torch_ms / r["median_ms"]
    line = "  ".join(
        f"{label} {r['median_ms']:7.2f} ms ({r['speedup_vs_torch_sdpa']:4.2f}x sdpa, "
        f"{r['fraction_of_copy_bandwidth']:4.0%} bw)"
        for label, r in record["results"].items()
    )
    print(f"T={context:6d} B={batch} G={group}:  {line}", flush=True)
    return record


def time_in_turns(calls: dict, runs: int, max_seconds: float) -> dict:
    """Median / min / max milliseconds of each call, timed in turns after one warm-up call each."""
    for fn in calls.values():
        fn()
    samples: dict = {label: [] for label in calls}
    deadline = time.perf_counter() + max_seconds
    for turn in range(runs):
        if turn >= 3 and time.perf_counter() > deadline:
            break
        for label, fn in calls.items():
            start = time.perf_counter()
            fn()
            samples[label].append((time.perf_counter() - start) * 1e3)
    return {label: _summary(s) for label, s in samples.items()}


def _summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"median_ms": ordered[len(ordered) // 2], "min_ms": ordered[0], "max_ms": ordered[-1], "runs": len(ordered)}


if __name__ == "__main__":
    main()
