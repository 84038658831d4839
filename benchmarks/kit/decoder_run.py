"""The decoder part of `benchmarks/kit/run.py` (on the GPU machine, or here in the dry run).

Three steps, each in a process of its own (so the 7B-shaped model's GPU memory is gone after it):
    1. tests/schedules/test_kv_attention_gpu.py   the paged-attention kernels vs float64 torch
    2. benchmarks/kit/decoder_greedy.py           artifacts vs transformers fp32/fp16: greedy tokens, logits
    3. benchmarks/decode_throughput_gpu.py        decode tokens/s vs transformers fp16, share of HBM bandwidth
Files into --out: decoder_greedy_*.json, decode_throughput_gpu_*.json, decoder.log (the three outputs;
the attention tests' pass/fail counts are in the greedy JSON's neighbour, decoder.log, and run.log).
"""

from __future__ import annotations

import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ATTENTION_GPU_TESTS = "tests/schedules/test_kv_attention_gpu.py"
STEP_TIMEOUT_S = 480


def _step(cmd: list[str], env: dict, log: list[str], title: str) -> tuple[int, float]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, output = 124, f"timed out after {STEP_TIMEOUT_S} s\n{err.stdout or ''}{err.stderr or ''}"
    seconds = time.perf_counter() - start
    log.append(f"===== {title}: exit {code} in {seconds:.0f} s\n{output.strip()}\n")
    return code, seconds


def _junit_counts(path: Path) -> dict:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    if not path.exists():
        return counts
    for case in ElementTree.parse(path).iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    path.unlink()
    return counts


def run_decoders(kit: Path, out: Path, env: dict, dry: bool) -> tuple[bool, list[str]]:
    """Run the three steps; returns (all passed, summary lines for run.log). decoder.log gets the rest."""
    log: list[str] = []
    summary: list[str] = []
    xml = out / "kv_attention_gpu.xml"
    marker = ["-m", "not slow"] if dry else ["-m", "gpu"]
    test_cmd = [sys.executable, "-m", "pytest", ATTENTION_GPU_TESTS, "-p", "no:cacheprovider", "-q", "-rfE"]
    code, seconds = _step([*test_cmd, *marker, f"--junitxml={xml}"], env, log, "attention kernel tests")
    counts = _junit_counts(xml)
    tests_ok = code == 0 and counts["failed"] == 0 and counts["passed"] > 0
    summary.append(
        f"attention kernel tests: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
        f"in {seconds:.0f} s"
    )
    out_args = ["--kit", str(kit), "--out", str(out)]
    code, seconds = _step([sys.executable, "benchmarks/kit/decoder_greedy.py", *out_args], env, log, "greedy equality")
    greedy_ok = code == 0
    summary.append(f"decoder greedy equality: {'passed' if greedy_ok else 'FAILED'} in {seconds:.0f} s")
    code, seconds = _step([sys.executable, "benchmarks/decode_throughput_gpu.py", *out_args], env, log, "throughput")
    throughput_ok = code == 0
    summary.append(f"decode throughput: {'done' if throughput_ok else 'FAILED'} in {seconds:.0f} s")
    tail = [line for line in log[-1].splitlines() if " tok/s " in line]
    summary += [f"  {line}" for line in tail]
    (out / "decoder.log").write_text("\n".join(log))
    return tests_ok and greedy_ok and throughput_ok, summary
