"""GPU decode attention over the paged KV cache per format (fp16, int8, int4, int2-kitty) vs torch SDPA in fp16.

    python3 benchmarks/kv_attention_gpu.py --kit .device-kit --out "$OUT"     (normally via kit/run.py)

For each (query heads, kv heads, head_dim) of the kit (32 query heads of head_dim 128 over 8 or 4 kv
heads: GQA group 4 and 8), batch B and context T (4k / 32k / 128k): one decode step, B query tokens at
position T - 1, each attending to its own T cached tokens in pages of 16 (page ids contiguous per
sequence). Side by side in one process:

    ours  the kit's `paged_attention` "decode" kernel (`schedules/kv_attention_cuda.py`) over the cache
          stored in each format (its codes and per-row scales, `compiler/formats/kv_*.py`)
    torch F.scaled_dot_product_attention(q, K, V, enable_gqa=True) in fp16 on dense [B, KVH, T, D] K and
          V: the fp16 cache's very data, gathered (what a framework without a paged or quantised cache runs)

Correctness first. At the check context (4k) every format's cache is quantised from random fp16 rows by
the format's numpy reference, and our output must match fp32 SDPA over the numpy-dequantised cache. At
every context the fp16 cache's output must match fp16 SDPA's on the same data. The timed quantised
caches hold random codes and scales (the time does not depend on their values). Each is timed with the
kit's Timer (CUDA events, cold L2, median; slow cases get fewer runs). Reported per case: time, speedup
over SDPA fp16 and over our fp16 cache, the bytes the step must read (the cache's bytes per token x T x
B, scales included, plus q and the output) as GB/s and as a fraction of the measured copy bandwidth.
int2-kitty's cache is the one the runtime leaves at T tokens (`benchmarks/kv_page_granular.py`): each
sequence's sink and window pages fp16, the rest in 2-bit pages of 128 tokens behind a tagged block table;
its check quantises random fp16 pages with the numpy page reference.
Target (issue 13, H100): int2 >= 5x our fp16 kernel at 32k; int8 / int4 have byte limits of about 2x / 3.8x.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Timer, environment, measure_copy_bandwidth, relative_error, timed_within, write_results
from benchmarks.kit.budget import TIMING_BUDGET_S
from benchmarks.kit.cases import kv_kernel_name
from benchmarks.kv_page_granular import from_dense, random_cache

CHECK_TOLERANCE = 2e-3  # fp16 output of fp32 sums, vs fp32 SDPA over the dequantised cache
SDPA_TOLERANCE = 5e-3  # vs fp16 SDPA (which rounds its own way)
LAYER = 0


def _library(kit: Path, section: dict, device_kind: str):
    from tensorpress.runtime import tvm_runtime

    if device_kind == "cuda":
        tvm_runtime.device("cuda")  # TVM's CUDA runtime: the fatbin loader
    ffi = tvm_runtime.ffi()
    return ffi, ffi.load_module(str(kit / section["library"]))


def _tables(batch: int, context: int, page_size: int, device):
    """positions, seq_slot, block_table of B sequences of `context` tokens, pages contiguous per sequence."""
    import torch

    pages = -(-context // page_size)
    table = torch.arange(batch * pages, dtype=torch.int32, device=device).reshape(batch, pages)
    positions = torch.full((batch,), context - 1, dtype=torch.int32, device=device)
    return positions, torch.arange(batch, dtype=torch.int32, device=device), table


def _dense(pool, batch: int, context: int):
    """[1, P, 2, KVH, PS, D] pages (contiguous per sequence) -> K, V as [B, KVH, T, D]."""
    _, p, _, kvh, ps, d = pool.shape
    per = pool[LAYER].reshape(batch, p // batch, 2, kvh, ps, d).permute(2, 0, 3, 1, 4, 5)
    kv = per.reshape(2, batch, kvh, (p // batch) * ps, d)[:, :, :, :context]
    return kv[0].contiguous(), kv[1].contiguous()


def _cache_shapes(fmt, kv_heads: int, head_dim: int, page_size: int, pages: int):
    return [
        (tuple(pages if d == "num_pages" else int(d) for d in t.shape), t.dtype)
        for t in fmt.cache_tensors(1, kv_heads, page_size, head_dim, "float16")
    ]


def _random_cache(fmt_name: str, shapes, device, generator):
    """Stored tensors with random contents: codes over their whole range, scales small and positive."""
    import torch

    tensors = []
    for shape, dtype in shapes:
        torch_dtype = getattr(torch, dtype)
        if fmt_name == "fp16":
            tensors.append(torch.randn(shape, generator=generator, device=device).to(torch_dtype))
        elif torch_dtype.is_floating_point:
            tensors.append((0.005 + 0.01 * torch.rand(shape, generator=generator, device=device)).to(torch_dtype))
        else:
            info = torch.iinfo(torch_dtype)
            tensors.append(torch.randint(info.min, info.max + 1, shape, generator=generator, device=device,
                                         dtype=torch_dtype))  # fmt: skip
    return tensors


def _quantised_cache(fmt, shapes, pool_shape, generator):
    """Stored arrays quantised from random fp16 rows by the format's numpy reference, and the
    dequantised pool [1, P, 2, KVH, PS, D] (fp16) that the kernel reads."""
    import numpy as np
    import torch

    head_dim = pool_shape[-1]
    rows = torch.randn(pool_shape, generator=generator).to(torch.float16).numpy().reshape(-1, head_dim)
    stored = fmt.quantize(rows, "float16")
    stored = [np.ascontiguousarray(a.reshape(*pool_shape[:-1], *a.shape[1:])) for a in stored]
    assert [a.shape for a in stored] == [s for s, _ in shapes], "the format's arrays and its cache tensors differ"
    return stored, fmt.dequantize(stored, "float16")


def timed(timer: Timer, fn, warmup: int, runs: int):
    return timed_within(timer, fn, warmup, runs, TIMING_BUDGET_S)


def _share(nbytes: int, ms: float, copy_bw: float | None) -> float | None:
    return nbytes / (ms * 1e-3) / copy_bw if copy_bw else None


def _sdpa(q, k, v):
    import torch

    return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]


def run_benchmark(kit: Path, out_dir: Path, runs: int = 50, warmup: int = 10) -> Path:
    import numpy as np
    import torch

    from tensorpress.compiler.formats import get_kv_cache_format

    manifest = json.loads((kit / "manifest.json").read_text())
    section = manifest["kv_bench"]
    device_kind = "cpu" if manifest["dry"] else "cuda"
    device = torch.device(device_kind)
    ffi, library = _library(kit, section, device_kind)
    timer = Timer(device)
    env = environment(commit=manifest["commit"]["sha"], extra={"kit": manifest["summary"]})
    copy_bw = measure_copy_bandwidth(device)
    ps = section["page_size"]
    checks, rows = [], []
    started = time.perf_counter()

    def call(name, q, cache, tables, out):
        args = [q, *cache, *tables]
        library[name](*[ffi.from_dlpack(t) for t in args], LAYER, ffi.from_dlpack(out))
        return out

    for config in section["configs"]:
        heads, kv_heads, head_dim = config["heads"], config["kv_heads"], config["head_dim"]
        group = heads // kv_heads
        for batch in section["batches"]:
            # correctness: each format quantised by its numpy reference, vs fp32 SDPA over its dequantised data
            context = section["check_context"]
            pages = batch * -(-context // ps)
            pool_shape = (1, pages, 2, kv_heads, ps, head_dim)
            tables = _tables(batch, context, ps, device)
            g = torch.Generator().manual_seed(batch * 1000 + group)
            q = torch.randn(batch, heads, head_dim, generator=g).to(torch.float16).to(device)
            for fmt_name in section["formats"]:
                fmt = get_kv_cache_format(fmt_name)
                check_tables = tables
                if hasattr(fmt, "quantised_tensors"):  # page-granular: fp16 sink + window, 2-bit pages
                    dense = torch.randn(2, batch, kv_heads, context, head_dim, generator=g).to(torch.float16).numpy()
                    stored, table, k_np, v_np = from_dense(fmt, dense[0], dense[1], ps, "float16")
                    k, v = torch.from_numpy(k_np).to(device), torch.from_numpy(v_np).to(device)
                    check_tables = (tables[0], tables[1], torch.from_numpy(table).to(device))
                else:
                    shapes = _cache_shapes(fmt, kv_heads, head_dim, ps, pages)
                    stored, pool = _quantised_cache(fmt, shapes, pool_shape, g)
                    k, v = _dense(torch.from_numpy(pool).to(device), batch, context)
                cache = [torch.from_numpy(a).to(device) for a in stored]
                reference = _sdpa(q.float(), k.float(), v.float())
                out = torch.full(q.shape, float("nan"), dtype=torch.float16, device=device)
                name = kv_kernel_name(fmt_name, heads, kv_heads, head_dim)
                err = relative_error(call(name, q, cache, check_tables, out), reference)
                sdpa_err = relative_error(_sdpa(q, k, v), reference) if device_kind == "cuda" else None
                point = {"format": fmt_name, "group": group, "batch": batch, "context": context}
                checks.append({**point, "rel_error": err, "sdpa_fp16_rel_error": sdpa_err,
                               "correct": err < CHECK_TOLERANCE})  # fmt: skip
            for context in section["contexts"]:
                pages = batch * -(-context // ps)
                tables = _tables(batch, context, ps, device)
                g = torch.Generator(device=device).manual_seed(context + batch)
                q = torch.randn(batch, heads, head_dim, generator=g, device=device).to(torch.float16)
                times, fp16_ms = {}, None
                for fmt_name in section["formats"]:
                    fmt = get_kv_cache_format(fmt_name)
                    step_tables, kv_bytes = (
                        tables,
                        fmt.bytes_per_token(1, kv_heads, head_dim, "float16") * context * batch,
                    )
                    if hasattr(fmt, "quantised_tensors"):  # page-granular: the runtime's tagged table
                        rng = np.random.default_rng(context + batch)
                        arrays, table, kv_bytes = random_cache(
                            fmt, batch, context, kv_heads, head_dim, ps, rng, "float16"
                        )
                        cache = [torch.from_numpy(a).to(device) for a in arrays]
                        step_tables = (tables[0], tables[1], torch.from_numpy(table).to(device))
                    else:
                        cache = _random_cache(fmt_name, _cache_shapes(fmt, kv_heads, head_dim, ps, pages), device, g)
                    name = kv_kernel_name(fmt_name, heads, kv_heads, head_dim)
                    out = torch.full(q.shape, float("nan"), dtype=torch.float16, device=device)
                    call(name, q, cache, step_tables, out)
                    row = {"format": fmt_name, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                           "group": group, "batch": batch, "context": context}  # fmt: skip
                    if fmt_name == "fp16":  # the same data through SDPA: checked, then timed
                        k, v = _dense(cache[0], batch, context)
                        sdpa_out = _sdpa(q, k, v)
                        err = relative_error(out, sdpa_out)
                        checks.append({"format": "fp16", "group": group, "batch": batch, "context": context,
                                       "rel_error_vs_sdpa_fp16": err, "correct": err < SDPA_TOLERANCE})  # fmt: skip
                        times["sdpa"] = timed(timer, lambda: _sdpa(q, k, v), warmup, runs)  # noqa: B023
                        del k, v
                    elif not torch.isfinite(out).all():
                        checks.append({"format": fmt_name, "group": group, "batch": batch, "context": context,
                                       "finite": False, "correct": False})  # fmt: skip
                    t = timed(timer, lambda: call(name, q, cache, step_tables, out), warmup, runs)  # noqa: B023
                    sdpa_bytes = 2 * context * batch * kv_heads * head_dim * 2 + 2 * q.numel() * 2
                    moved = kv_bytes + 2 * q.numel() * 2  # q in, output out (fp16)
                    fp16_ms = t.median_ms if fmt_name == "fp16" else fp16_ms
                    rate = moved / (t.median_ms * 1e-3)
                    row.update(
                        ours=t, ours_ms=t.median_ms, sdpa_fp16=times["sdpa"], kv_bytes=kv_bytes, bytes_moved=moved,
                        gb_per_s=rate / 1e9, fraction_of_copy_bandwidth=rate / copy_bw if copy_bw else None,
                        speedup_over_sdpa=times["sdpa"].median_ms / t.median_ms,
                        speedup_over_fp16_cache=(fp16_ms / t.median_ms) if fp16_ms else None,
                        sdpa_fraction_of_copy_bandwidth=_share(sdpa_bytes, times["sdpa"].median_ms, copy_bw),
                    )  # fmt: skip
                    rows.append(row)
                    print(f"{fmt_name:<5} G={group} B={batch:<2} T={context:<6} ours {t.median_ms * 1e3:8.1f} us "
                          f"SDPA {times['sdpa'].median_ms * 1e3:8.1f} us  x{row['speedup_over_sdpa']:5.2f}  "
                          f"{row['fraction_of_copy_bandwidth'] or 0:4.0%} copy bw", flush=True)  # fmt: skip
                if device_kind == "cuda":
                    torch.cuda.empty_cache()
    payload = {
        "benchmark": "kv_attention_gpu",
        "what": "one decode step of paged attention over the KV cache per format (tensorpress CUDA schedule) vs "
        "torch SDPA fp16 on dense K/V of the same shape (the fp16 cache's data)",
        "environment": env,
        "dry_run": bool(manifest["dry"]),
        "copy_bandwidth": copy_bw,
        "runs_per_timing": runs,
        "page_size": ps,
        "seconds": time.perf_counter() - started,
        "checks": checks,
        "rows": rows,
    }
    return write_results(out_dir, "kv_attention_gpu", payload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", type=Path, default=Path(".device-kit"), help="prepared kit folder")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON results")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per measurement (at most)")
    args = parser.parse_args(argv)
    print(f"results: {run_benchmark(args.kit, args.out, runs=args.runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
