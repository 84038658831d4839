"""The kernel benchmark harness: a kernel and its baseline, same data, one process, timed alike.

    timer = Timer(torch.device("cuda"))          # CUDA events, L2 flushed before every run
    kernel = timer.time(lambda: f(*args))        # Timing(median_ms, p10_ms, p90_ms, runs)
    baseline = timer.time(lambda: torch.matmul(x, wt, out=y))
    env = environment()                          # device, driver, versions, commit
    write_results(out_dir, "gemm_weight", {"environment": env, "records": [...]})

Rules it keeps (DESIGN.md "Performance is measured side by side", device METHOD.md): warm-up runs
first; every timed run starts with a cold L2 (a buffer twice the L2 size is rewritten between runs,
outside the timed interval); the median of many runs is reported with its spread; bandwidth is
bytes moved / time against the device's measured copy bandwidth (read + write) and its datasheet
figure. On a machine without CUDA (the dry run) it times with the host clock and says so.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Datasheet DRAM bandwidth (bytes/s) by a substring of torch's device name; first match wins.
DATASHEET_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),  # SXM5 80 GB HBM3
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40 GB
    ("L40S", 0.864e12),
    ("A10", 0.6e12),
)


@dataclass
class Timing:
    """Milliseconds of one call: median and the 10th/90th percentiles over `runs` timed runs."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    clock: str  # "cuda-events" or "host"


def datasheet_bandwidth(device_name: str) -> float | None:
    for key, value in DATASHEET_BANDWIDTH:
        if key in device_name:
            return value
    return None


class Timer:
    """Times a callable on `device` (a torch.device): CUDA events with an L2 flush per run, or the
    host clock on the CPU."""

    def __init__(self, device, flush_bytes: int | None = None):
        import torch

        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
            self.flush_buffer = torch.empty(flush_bytes or 2 * l2, dtype=torch.uint8, device=device)

    def flush_l2(self) -> None:
        if self.cuda:
            self.flush_buffer.zero_()

    def time(self, fn: Callable[[], Any], warmup: int = 10, runs: int = 50, max_seconds: float = 10.0) -> Timing:
        import torch

        for _ in range(warmup):
            fn()
        if not self.cuda:
            samples = []
            deadline = time.perf_counter() + max_seconds
            while len(samples) < runs and (len(samples) < 3 or time.perf_counter() < deadline):
                start = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - start) * 1e3)
            return _timing(samples, "host")
        torch.cuda.synchronize(self.device)
        pairs = []
        for _ in range(runs):
            self.flush_l2()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(self.device)
        return _timing([s.elapsed_time(e) for s, e in pairs], "cuda-events")


def timed_within(timer: Timer, fn: Callable[[], Any], warmup: int, runs: int, budget_s: float) -> Timing:
    """timer.time(fn) with no more runs than fit `budget_s` seconds (one probe call sizes it; at least
    5 runs): a kernel far slower than hoped cannot eat a short device session."""
    import torch

    def once() -> float:
        start = time.perf_counter()
        fn()
        if timer.cuda:
            torch.cuda.synchronize(timer.device)
        return time.perf_counter() - start

    once()  # first call: module load, workspace
    fit = int(budget_s / max(once(), 1e-6))
    return timer.time(fn, min(warmup, max(1, fit // 10)), max(min(runs, fit), min(runs, 5)))


def _timing(samples: list[float], clock: str) -> Timing:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return Timing(statistics.median(ordered), pick(0.1), pick(0.9), len(ordered), clock)


def measure_copy_bandwidth(device, nbytes: int = 1 << 30) -> float | None:
    """Copy bandwidth of the device's memory in bytes/s, counting bytes read plus written.

    On the CPU: torch's (multi-threaded) copy of 512 MiB, the fastest of a few, which is what a
    memory-bound kernel on this machine can hope to stream; caches hold none of it.
    """
    import torch

    if device.type != "cuda":
        src = torch.ones(min(nbytes, 1 << 29), dtype=torch.uint8)
        dst = torch.empty_like(src)
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            dst.copy_(src)
            samples.append(time.perf_counter() - start)
        return 2 * src.numel() / min(samples)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = Timer(device, flush_bytes=1 << 20).time(lambda: dst.copy_(src), warmup=3, runs=20)
    return 2 * nbytes / (timing.median_ms * 1e-3)


def relative_error(out, reference) -> float:
    """max |out - ref| / max |ref| in float32; inf when `out` has NaN or Inf (unwritten outputs)."""
    import torch

    out32, ref32 = out.float(), reference.float()
    if not torch.isfinite(out32).all():
        return float("inf")
    return float((out32 - ref32).abs().max() / ref32.abs().max().clamp_min(1e-30))


def environment(commit: str | None = None, extra: dict | None = None) -> dict:
    """Device, driver and library versions, and the git commit measured (`commit`, else git's)."""
    import numpy
    import torch

    env: dict[str, Any] = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "commit": commit or _git_commit(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_bytes=props.total_memory,
            l2_bytes=getattr(props, "L2_cache_size", None),
            cuda_runtime=torch.version.cuda,
            driver=_nvidia_smi("driver_version"),
            clocks_sm_mhz=_nvidia_smi("clocks.sm"),
            datasheet_bandwidth=datasheet_bandwidth(props.name),
        )
    else:
        env.update(device=f"cpu ({platform.processor() or platform.machine()})", cuda_runtime=None, driver=None)
    env.update(extra or {})
    return env


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_results(out_dir: str | os.PathLike, name: str, payload: dict) -> Path:
    """Write `payload` as JSON to out_dir/<name>_<device>_<time>.json (written whole, then renamed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = payload.get("environment", {})
    device = "".join(ch if ch.isalnum() else "-" for ch in str(env.get("device", "unknown"))).strip("-")[:40]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return write_json(out_dir / f"{name}_{device}_{stamp}.json", payload)


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write `payload` as JSON to `path` (its folder made if needed; written whole, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_jsonable))
    os.replace(tmp, path)
    return path


def _jsonable(value):
    if isinstance(value, Timing):
        return asdict(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value)}")
