"""Device seconds the kit's sparse, KV and tuning parts should take on an H100 / H200, from the manifest alone.

A device session has about 15 minutes in all (start-up included) and the issues give each part 4
minutes, so prepare.py prints these before anything is carried. Two figures per part:
    expected  every kernel at half the copy bandwidth (3.0 TB/s on the H100, read + write), the numpy
              packers at their rates per core (bitmap: PACK_RATE elements/s, tiled-csl:
              CSL_PACK_NONZEROS_RATE nonzeros/s) on PACK_CORES cores, fixed costs as below
    bound     as expected, but every timing spending its whole budget (TIMING_BUDGET_S: the benchmarks
              cut the runs of a slow kernel to fit it), so a kernel 100x slower than hoped still fits
The dry run's own seconds (the kit's dry test) are a floor for the Python around the kernels.
"""

from __future__ import annotations

COPY_BW = 3.0e12  # H100 device-to-device copy, read + write (KINDS.md); the H200 is faster
KERNEL_BW = COPY_BW / 2  # pessimistic share a kernel reaches
FLUSH_S = 100e6 / COPY_BW  # the Timer rewrites 2 x L2 (~100 MB) before every timed run
RUNS, WARMUP = 50, 10
TIMING_BUDGET_S = 0.15  # device seconds one timing of the sparse and KV benchmarks may take (harness.timed_within)
PACK_RATE = 18e6  # bitmap numpy packer, elements/s on one core (measured here: 8192 x 8192 in 3.6 s)
FPX_PACK_RATE = 2e6  # sparse x FP6 numpy packer (FPx encode, tiles, exact W), elements/s a core (here: 1.8e6 at load 6)
# tiled-csl numpy packer: its cost follows the nonzeros (here: 4.2e6 of them, 50 % of 1024 x 8192, in
# 0.7-1.1 s at load 5; 0.84e6 at 90 % in 0.23 s)
CSL_PACK_NONZEROS_RATE = 4e6
PACK_CORES = 12  # of the device's 16 (16 spawned packers, some contention)
START_S = 15.0  # a part's fixed cost: torch + CUDA context, copy bandwidth, the packers' spawn, JSON
# page-granular KV caches (int2-kitty) are built on the host in numpy (benchmarks/kv_page_granular.py),
# measured here on one core: quantised from dense rows for the check, random for the timed cases
PAGE_CHECK_ROWS_PER_S = 26e3  # (token, kv head) rows through the numpy page reference
PAGE_RANDOM_ROWS_PER_S = 420e3  # (token, kv head) rows of random pools and tables


def _timing(seconds_per_call: float) -> tuple[float, float]:
    """(expected, bound) device seconds of one timed measurement of a call taking seconds_per_call."""
    probe = 2 * seconds_per_call
    full = (RUNS + WARMUP) * (seconds_per_call + FLUSH_S)
    return probe + min(full, TIMING_BUDGET_S), probe + TIMING_BUDGET_S


def gemm_estimate(bench: dict) -> dict:
    """The dense / FPx GEMM benchmark (benchmarks/gemm_weight.py): full RUNS + WARMUP, no budget cap."""
    expected = START_S
    timings = 0
    for spec in bench.values():
        m, k = spec["m"], spec["k"]
        weight_bytes = m * k * (2 if spec.get("format", "dense-fp16").startswith("dense") else 0.8)  # FPx ~6 bits
        for n in spec["tokens"]:
            for _ in range(len(spec["candidates"]) + 1):  # + cuBLAS
                call = (weight_bytes + n * (m + k) * 2) / KERNEL_BW
                expected, timings = expected + (RUNS + WARMUP + 2) * (call + FLUSH_S), timings + 1
    return {"timings": timings, "expected_s": round(expected), "bound_s": None}


def sparse_estimate(section: dict) -> dict:
    from benchmarks.kit.cases import sparse_mask_cases

    expected = bound = START_S
    timings = 0
    for spec in section.values():
        m, k = spec["m"], spec["k"]
        for sparsity, mask, tokens in sparse_mask_cases(spec):  # each a pruned W, its bitmap candidates
            pack = m * k / (PACK_RATE * PACK_CORES) + m * k * 2 * 2 / 10e9  # numpy + to host and back
            expected, bound = expected + pack, bound + pack
            for n in tokens:
                dense_s = (m * k * 2 + (n * (m + k)) * 2) / KERNEL_BW
                sparse_s = (m * k * ((1 - sparsity) * 2 + 1 / 8) + (n * (m + k)) * 2) / KERNEL_BW
                semi = [dense_s] if mask == "random" and sparsity == 0.5 else []  # 2:4, as cuBLAS's bytes
                for call in [dense_s] + [sparse_s] * len(spec["candidates"]) + semi:
                    e, b = _timing(call)
                    expected, bound, timings = expected + e + call, bound + b + call, timings + 1
        csl = spec.get("tiled_csl", {})
        for sparsity in csl.get("sparsities", []):  # tiled-csl: its packer on the same W, then its candidates
            nonzeros = m * k * (1 - sparsity)
            pack = nonzeros / (CSL_PACK_NONZEROS_RATE * PACK_CORES) + (m * k * 2 + nonzeros * 4) / 10e9
            expected, bound = expected + pack, bound + pack
            for n in spec["tokens"]:
                call = (nonzeros * 4 + m * k * 10 / 1024 + (n * (m + k)) * 2) / KERNEL_BW  # + padding, offsets
                for _ in csl["candidates"]:
                    e, b = _timing(call)
                    expected, bound, timings = expected + e + call, bound + b + call, timings + 1
        fpx = spec.get("fpx", {})
        for sparsity in fpx.get("sparsities", []):  # sparse x FP6: its packer, then its candidates
            pack = m * k / (FPX_PACK_RATE * PACK_CORES) + m * k * (4 + 2) / 10e9  # + the exact W up
            expected, bound = expected + pack, bound + pack
            for n in spec["tokens"]:
                call = (m * k * ((1 - sparsity) * 0.75 + 1 / 8) + (n * (m + k)) * 2) / KERNEL_BW
                for _ in fpx["candidates"]:
                    e, b = _timing(call)
                    expected, bound, timings = expected + e + call, bound + b + call, timings + 1
    return {"timings": timings, "expected_s": round(expected), "bound_s": round(bound)}


def kv_estimate(section: dict) -> dict:
    from tensorpress.compiler.formats import get_kv_cache_format

    expected = bound = START_S
    timings = 0
    for config in section["configs"]:
        kvh, d = config["kv_heads"], config["head_dim"]
        for batch in section["batches"]:
            rows = batch * section["check_context"] * 2 * kvh
            check = len(section["formats"]) * rows * d / 20e6  # numpy quantize + dequantize
            page_granular = [f for f in section["formats"] if hasattr(get_kv_cache_format(f), "quantised_tensors")]
            check += len(page_granular) * batch * section["check_context"] * kvh / PAGE_CHECK_ROWS_PER_S
            expected, bound = expected + check, bound + check
            for context in section["contexts"]:
                host = len(page_granular) * batch * context * kvh / PAGE_RANDOM_ROWS_PER_S
                expected, bound = expected + host, bound + host
                for fmt in [*section["formats"], "fp16"]:  # + SDPA, which reads fp16
                    per_token = get_kv_cache_format(fmt).bytes_per_token(1, kvh, d, "float16")
                    e, b = _timing(per_token * context * batch / KERNEL_BW)
                    expected, bound, timings = expected + e, bound + b, timings + 1
    return {"timings": timings, "expected_s": round(expected), "bound_s": round(bound)}


WEIGHT_BAND_ELEMENTS_S = 5e6  # dense / FPx band of 512 rows made by numpy (FP6: 7.5e6/s here at load 7.6)


def tuning_estimate(section: dict) -> dict:
    """The tuning part (tuning_run.py): per point, every candidate checked once then timed (timed_within),
    until the point's share of section["budget_s"] is spent; then the confirmation rounds. Expected: all
    candidates timed at KERNEL_BW; bound: the budget spent, plus a last timing and the confirmation
    rounds each using their whole TIMING_BUDGET_S, plus the weights."""
    from benchmarks.kit.tuning_run import CONFIRM_ROUNDS, CONFIRM_TOP, WEIGHT_BAND_ROWS

    fixed = START_S
    timings = 0
    candidates_s = confirm_expected = confirm_bound = 0.0
    for kernel in section["kernels"]:
        m, k, fmt = kernel["m"], kernel["k"], kernel["fmt"]
        if fmt.startswith("bitmap"):  # pruned, packed whole in 12 processes
            fixed += m * k / ((FPX_PACK_RATE if fmt != "bitmap" else PACK_RATE) * PACK_CORES)
        else:
            fixed += min(m, WEIGHT_BAND_ROWS) * k / WEIGHT_BAND_ELEMENTS_S
        weight_bytes = m * k * (2 if fmt.startswith("dense") else 0.8)
        for point in kernel["points"]:
            call = (weight_bytes + point["tokens"] * (m + k) * 2) / KERNEL_BW
            expected, bound = _timing(call)
            finalists = min(len(point["candidates"]), CONFIRM_TOP + 1)
            candidates_s += len(point["candidates"]) * (expected + call)
            confirm_expected += finalists * CONFIRM_ROUNDS * expected
            confirm_bound += finalists * CONFIRM_ROUNDS * bound + bound  # + a timing begun at the deadline
            timings += len(point["candidates"]) + finalists * CONFIRM_ROUNDS
    budget = section["budget_s"]
    return {
        "timings": timings,
        "expected_s": round(fixed + min(candidates_s, budget) + confirm_expected),
        "bound_s": round(fixed + budget + confirm_bound),
    }
