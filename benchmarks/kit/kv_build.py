"""Build the KV part of the GPU kit: decode attention over the fp16, int8 and int4 paged caches.

    kit/kernels/kv_decode.so   `paged_attention` "decode" per (format, query heads, kv heads, head_dim),
                               named `cases.kv_kernel_name(...)`, the project's CUDA schedule
                               (`schedules/kv_attention_cuda.py`); dry run: the same schedule replayed
                               for the CPU, as the decoder part's attention kernels are

`build_kv_part` returns the manifest's "kv_bench" section, which `benchmarks/kv_attention_gpu.py` reads.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.kit.cases import (
    DRY_KV_BATCHES,
    DRY_KV_CHECK_CONTEXT,
    DRY_KV_CONFIGS,
    DRY_KV_CONTEXTS,
    KV_BATCHES,
    KV_CHECK_CONTEXT,
    KV_CONFIGS,
    KV_CONTEXTS,
    KV_FORMATS,
    KV_PAGE_SIZE,
    kv_kernel_name,
)

LIBRARY = "kernels/kv_decode.so"


def build_kv_part(kit: Path, arch: str | None, dry: bool) -> dict:
    """Build LIBRARY under the kit folder `kit` (arch None: CPU replay) and return its section."""
    import tvm

    from tensorpress.compiler.formats import get_kv_cache_format
    from tensorpress.schedules.kv_attention import paged_attention_func
    from tensorpress.schedules.kv_attention_cuda import schedule_attention

    configs = DRY_KV_CONFIGS if dry else KV_CONFIGS
    start = time.perf_counter()
    functions = {}
    for fmt in KV_FORMATS:
        for heads, kv_heads, head_dim in configs:
            func = paged_attention_func(
                get_kv_cache_format(fmt), heads, kv_heads, head_dim, KV_PAGE_SIZE, "float16", "decode"
            )
            name = kv_kernel_name(fmt, heads, kv_heads, head_dim)
            functions[name] = schedule_attention(func).mod["main"].with_attr("global_symbol", name)
    mod = tvm.IRModule(functions)
    out = kit / LIBRARY
    if arch is None:
        from tensorpress.schedules.verification.kv_attention_replay import build_replay

        build_replay(mod, seed=None).export_library(str(out))
    else:
        from tensorpress.compiler.cuda.toolchain import ensure_cuda_build_support, library_has_gpu_binary
        from tensorpress.schedules.verification.cuda_inspection import cuda_target

        ensure_cuda_build_support()
        target = cuda_target(arch)
        with target:
            tvm.compile(mod, target=target).export_library(str(out))
        if not library_has_gpu_binary(out):
            raise RuntimeError(f"{out} holds no GPU binary: the nvcc toolchain is not in use")
    return {
        "library": LIBRARY,
        "formats": list(KV_FORMATS),
        "configs": [{"heads": h, "kv_heads": g, "head_dim": d} for h, g, d in configs],
        "contexts": list(DRY_KV_CONTEXTS if dry else KV_CONTEXTS),
        "batches": list(DRY_KV_BATCHES if dry else KV_BATCHES),
        "check_context": DRY_KV_CHECK_CONTEXT if dry else KV_CHECK_CONTEXT,
        "page_size": KV_PAGE_SIZE,
        "build_seconds": round(time.perf_counter() - start, 1),
    }
