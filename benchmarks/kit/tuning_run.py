"""The kit's tuning part, on the device: time every prepared candidate tile config within a budget of
device seconds and write the timings as ready-made tuning records (compiler/tuning/records.py lines).

    python3 benchmarks/kit/run.py --kit .tuning-kit --only tune --out "$OUT"     the GPU machine
    tensorpress tune --import-kit "$OUT" --log tuning_logs/sm_90a                 back here

The kit (compiler/tuning/tuning_kit.py) lists kernels, each with its candidates (built here: nothing can
be rebuilt on the device, which has no TVM compiler) and its points (a record key: the kernel at one token
count). Per point, in the kit's order:
  1. weights, made once per kernel: random dense fp16 or FPx codes (weights.py) for a band of
     WEIGHT_BAND_ROWS rows, repeated down M; bitmap and bitmap-e3m2 pruned at random to the density that
     fills the recorded buffers (sparse_weights.py, the packers in 12 processes)
  2. each candidate's first output is checked against X · Wᵀ in fp32: a wrong kernel is a failed trial
     (seconds null), never a best
  3. rounds of ROUND candidates: the default first, then the kit's order (chosen where the compiler is:
     the cost model's ranking with random picks); where xgboost imports (it is not on this project's
     GPU machines: KINDS.md), the rest are ranked after each round by a model fitted to log-seconds of
     those timed. Each timing is capped by harness.timed_within; a point stops when its share of the
     budget (what is left / points left) is spent
  4. confirmation: the default and the CONFIRM_TOP fastest timed again, CONFIRM_ROUNDS rounds in turn;
     another config replaces the default only when faster by CONFIRM_MARGIN (as template_search.py)
Writes tuning_<device>_<time>.json: "rows" (the record lines, trial and best, each with the run id and
its row number, so an import can be rerun) and "points" (default and best times, seconds until a trial
reached 95 % of the best, candidates timed, whether the budget cut the point short).
"""

from __future__ import annotations

import math
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.harness import Timer, environment, relative_error, timed_within, write_results
from benchmarks.kit.budget import TIMING_BUDGET_S

ROUND = 8  # candidates timed before a model (if any) re-ranks the rest
CONFIRM_TOP = 3
CONFIRM_ROUNDS = 2  # a GPU's timings are steadier than a shared CPU's (template_search.py uses 5)
CONFIRM_MARGIN = 0.03
TOLERANCE = 2e-3  # fp16 output, fp32 accumulation (gemm_weight.py)
RESULTS = "tuning"
WEIGHT_BAND_ROWS = 512  # rows of random dense / FPx weight made, then repeated down M


def run_tuning(kit: Path, out: Path, dry: bool, budget_s: float | None = None, log=print) -> Path:
    """Time the kit's tuning part (module docstring) on the device (the CPU for a dry kit); returns the
    results JSON. `budget_s`: device seconds for every point together (default: the kit's)."""
    import json

    import torch

    manifest = json.loads((kit / "manifest.json").read_text())
    section = manifest["tuning"]
    device = torch.device("cpu" if dry else "cuda")
    timer = Timer(device)
    budget = float(section["budget_s"] if budget_s is None else budget_s)
    runs, warmup = (3, 1) if dry else (50, 10)
    run_id = uuid.uuid4().hex
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    points: list[dict[str, Any]] = []
    left = sum(len(k["points"]) for k in section["kernels"])
    for kernel in section["kernels"]:
        functions = _functions(kit, kernel, "cpu" if dry else "cuda")
        weight = _weight(kernel, device)
        for point in kernel["points"]:
            share = max(budget - (time.perf_counter() - start), 0.0) / left
            left -= 1
            result = _tune_point(kernel, point, functions, weight, timer, share, warmup, runs, section["schema"])
            for row in result.pop("rows"):  # dry: timed on the CPU, never for an arch's log (kit_import.py)
                rows.append({**row, "run": run_id, "row": len(rows), **({"dry": True} if dry else {})})
            points.append(result)
            log(
                f"  {kernel['fmt']:<12} {kernel['m']}x{kernel['k']} N={point['tokens']:<3} "
                f"best {_ms(result['best_seconds'])} vs default {_ms(result['default_seconds'])} "
                f"({result['timed']}/{len(point['candidates'])} timed, 95% after {result['seconds_to_95']} s)"
            )
    env = environment(commit=manifest["commit"]["sha"], extra={"kit": manifest["summary"]})
    payload = {
        "environment": env,
        "run": run_id,
        "arch": section["arch"],
        "dry": dry,
        "budget_s": budget,
        "seconds": round(time.perf_counter() - start, 1),
        "points": points,
        "rows": rows,
    }
    return write_results(out, RESULTS, payload)


def _ms(seconds: float | None) -> str:
    return "failed" if seconds is None else f"{seconds * 1e3:.4f} ms"


def _functions(kit: Path, kernel: dict, device_kind: str) -> list:
    from benchmarks.kit.kernels import _load_module

    module = _load_module(str(kit / kernel["library"]), device_kind)
    return [module[c["entry"]] for c in kernel["candidates"]]


def _weight(kernel: dict, device):
    """(stored tensors in the kernel's argument order, the fp32-able W they decode to)."""
    fmt, m, k = kernel["fmt"], kernel["m"], kernel["k"]
    buffers = {name: shape for name, shape, _ in kernel["buffers"]}
    if fmt in ("bitmap", "bitmap-e3m2"):
        from benchmarks.kit.sparse_weights import BandPacker, make_sparse_fpx_weight, make_sparse_weight, random_pruned

        packer = BandPacker(0 if device.type == "cpu" else 12)
        try:
            if fmt == "bitmap":
                capacity = buffers["values"][0]
                sparse = make_sparse_weight(m, k, _sparsity(m, k, capacity - 1), device, packer, capacity)
            else:
                from tensorpress.compiler.formats import code_stream, get_weight_format
                from tensorpress.compiler.formats.bitmap_fpx import SPARE_CODES

                bits = get_weight_format(fmt).code_bits()
                capacity = buffers[code_stream.NAME][1] * code_stream.WORD_BITS // bits  # codes the stream holds
                dense = random_pruned(m, k, _sparsity(m, k, capacity - SPARE_CODES), device, seed=0)
                sparse = make_sparse_fpx_weight(dense, packer, capacity)
        finally:
            packer.close()
        return sparse.stored, sparse.dense
    from benchmarks.kit.weights import make_weight

    # dense and FPx rows are stored independently (a row of W is a row of every plane), so a random
    # band of rows repeated down M is a valid weight: seconds instead of minutes of numpy FPx packing
    band = make_weight(fmt, min(m, WEIGHT_BAND_ROWS), k, device)
    repeat = -(-m // band.dense.shape[0])

    def rows(t):
        return t.repeat(repeat, *([1] * (t.dim() - 1)))[:m].contiguous()

    return [rows(t) for t in band.stored], rows(band.dense)


def _sparsity(m: int, k: int, slots: int) -> float:
    """A sparsity whose random masks (kept_per_row per row) keep at most `slots` weights in all."""
    from benchmarks.kit.cases import kept_per_row

    kept = max(1, min(k, slots // m))
    while m * kept_per_row(k, 1 - kept / k) > slots:
        kept -= 1
    return 1 - kept / k


def _tune_point(kernel, point, functions, weight, timer, share_s, warmup, runs, schema) -> dict[str, Any]:
    import torch

    from benchmarks.kit.kernels import _runtime

    stored, dense = weight
    n, key = point["tokens"], point["key"]
    device = dense.device
    g = torch.Generator(device="cpu").manual_seed(n)
    x = torch.randn(n, kernel["k"], generator=g).to(torch.float16).to(device)
    y = torch.empty(n, kernel["m"], dtype=torch.float16, device=device)
    reference = x.float() @ dense.float().t()
    ffi = _runtime("cpu" if device.type == "cpu" else "cuda")
    args = [ffi.from_dlpack(t) for t in [x, *stored, y]]
    configs = {j: kernel["candidates"][j]["config"] for j in point["candidates"]}
    start = time.perf_counter()
    deadline = start + share_s
    measured: dict[int, float] = {}
    history: list[tuple[float, float]] = []
    rows: list[dict[str, Any]] = []

    def timed(j: int) -> float:
        call = lambda: functions[j](*args)  # noqa: E731
        try:
            y.fill_(float("nan"))
            call()
            if relative_error(y, reference) >= TOLERANCE:
                return math.inf
            return timed_within(timer, call, warmup, runs, TIMING_BUDGET_S).median_ms / 1e3
        except Exception:  # noqa: BLE001 - a candidate that cannot run is a failed trial, never a crash
            return math.inf

    order = [point["default"], *[j for j in point["candidates"] if j != point["default"]]]
    while order and (not measured or time.perf_counter() < deadline):
        batch, order = order[:ROUND], order[ROUND:]
        for j in batch:
            if measured and time.perf_counter() >= deadline:
                order = []
                break
            seconds = measured[j] = timed(j)
            elapsed = time.perf_counter() - start
            history.append((elapsed, seconds))
            rows.append(_row(schema, "trial", key, configs[j], seconds, elapsed=round(elapsed, 3)))
        order = _ranked(order, measured, configs)
    confirmed = _confirm(point["default"], measured, timed)
    best = _chosen(confirmed, point["default"])
    elapsed = time.perf_counter() - start
    default_s = confirmed.get(point["default"], math.inf)
    best_s = confirmed.get(best, math.inf)
    rows.append(
        _row(
            schema,
            "best",
            key,
            configs[best],
            best_s,
            default_seconds=default_s if math.isfinite(default_s) else None,
            trials=len(measured),
            elapsed=round(elapsed, 3),
        )
    )
    return {
        "kernel": kernel["name"],
        "format": kernel["fmt"],
        "m": kernel["m"],
        "k": kernel["k"],
        "tokens": n,
        "default_seconds": default_s if math.isfinite(default_s) else None,
        "best_seconds": best_s if math.isfinite(best_s) else None,
        "best_config": configs[best],
        "speedup": default_s / best_s if math.isfinite(best_s) and math.isfinite(default_s) else None,
        "timed": len(measured),
        "failed": sum(not math.isfinite(s) for s in measured.values()),
        "cut_by_budget": len(measured) < len(configs),
        "seconds": round(elapsed, 3),
        "seconds_to_95": _seconds_to_within(history, 0.95),
        "rows": rows,
    }


def _row(schema: str, kind: str, key: dict, config: dict, seconds: float, **extra) -> dict[str, Any]:
    """A record line as records.append_record writes it (seconds None: failed)."""
    line = {"schema": schema, "type": kind, "key": key, "config": config}
    line["seconds"] = seconds if math.isfinite(seconds) else None
    return {**line, **extra, "source": "gpu-kit"}


def _confirm(default: int, measured: dict[int, float], timed) -> dict[int, float]:
    """{candidate: fastest of its confirmation timings} for the default and the CONFIRM_TOP fastest."""
    ranked = sorted((j for j in measured if math.isfinite(measured[j])), key=measured.__getitem__)
    finalists = [default] if math.isfinite(measured.get(default, math.inf)) else []
    finalists += [j for j in ranked if j != default][:CONFIRM_TOP]
    best = {j: measured[j] for j in finalists}
    for round_ in range(CONFIRM_ROUNDS if len(finalists) > 1 else 0):
        shift = round_ % len(finalists)
        for j in finalists[shift:] + finalists[:shift]:
            best[j] = min(best[j], timed(j))
    return best


def _chosen(confirmed: dict[int, float], default: int) -> int:
    if not confirmed:
        return default
    fastest = min(confirmed, key=confirmed.__getitem__)
    if default in confirmed and confirmed[fastest] * (1 + CONFIRM_MARGIN) >= confirmed[default]:
        return default
    return fastest


def _ranked(order: list[int], measured: dict[int, float], configs: dict[int, dict]) -> list[int]:
    """`order` re-ranked by an XGBoost model of log-seconds fitted to the timed candidates, where xgboost
    is importable and enough were timed; else `order` as the kit gave it."""
    finite = {j: s for j, s in measured.items() if math.isfinite(s)}
    if not order or len(finite) < 4:
        return order
    try:
        import numpy as np
        import xgboost
    except ImportError:
        return order
    names = sorted(next(iter(configs.values())))

    def features(j: int) -> list[float]:
        return [math.log2(float(configs[j][name])) for name in names]

    worst = max(finite.values())
    done = list(measured)
    model = xgboost.XGBRegressor(n_estimators=60, max_depth=3, learning_rate=0.2, n_jobs=1, verbosity=0)
    model.fit(np.array([features(j) for j in done]), np.log([min(measured[j], 4 * worst) for j in done]))
    predicted = model.predict(np.array([features(j) for j in order]))
    return [order[i] for i in np.argsort(predicted, kind="stable")]


def _seconds_to_within(history: list[tuple[float, float]], fraction: float) -> float | None:
    """Seconds of the search until a trial reached `fraction` of the best trial's speed."""
    best = min((s for _, s in history), default=math.inf)
    if not math.isfinite(best):
        return None
    return next((round(e, 3) for e, s in history if best / s >= fraction), None)
