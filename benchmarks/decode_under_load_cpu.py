"""CPU decode throughput on an idle CPU and beside other work: tensorpress vs transformers eager.

A serving host is never idle. The load here is what issue 15 measured: LOAD_PROCESSES processes that
each run a 2-thread torch matmul loop. For each condition (idle, loaded) each side decodes greedily in
a fresh process (so one side's thread pool never spins against the other's), batch 1, and reports
decode tokens/s (prefill excluded), best of REPEATS runs; then the ratio loaded/idle per side.
Goal (issue 15, item 10): ours keeps >= 0.25 of its idle rate and beats transformers under load.

    .venv/bin/python benchmarks/decode_under_load_cpu.py                        # random Llama 256x4
    .venv/bin/python benchmarks/decode_under_load_cpu.py --random-llama 512x8 --new-tokens 64
    .venv/bin/python benchmarks/decode_under_load_cpu.py --env TVM_NUM_THREADS=1  # try a pool setting
    # TVM's own defaults as before issue 15 (pool of 2, pinned, long spin; no per-call choice):
    .venv/bin/python benchmarks/decode_under_load_cpu.py --env TVM_NUM_THREADS=2 --env TVM_BIND_THREADS=1 \
        --env TVM_THREAD_POOL_SPIN_COUNT=300000 --out /tmp/decode_under_load_before.json

Writes JSON (default benchmarks/results/decode_under_load_cpu.json) with machine, versions, commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "decode_under_load_cpu.json"
REPEATS = 3
LOAD_PROCESSES = 2
LOAD_THREADS = 2

LOAD_LOOP = f"""
import torch
torch.set_num_threads({LOAD_THREADS})
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""

# One side's measurement, in a fresh process: prints {"tokens_per_s": ..., "tokens": [...]}.
MEASURE = """
import json, sys, time
side, folder, artifact, prompt_tokens, new_tokens, repeats = sys.argv[1:7]
prompt_tokens, new_tokens, repeats = int(prompt_tokens), int(new_tokens), int(repeats)
import numpy as np
prompt = np.random.default_rng(0).integers(3, 1000, prompt_tokens).tolist()
rates = []
if side == "tensorpress":
    import tensorpress.runtime
    model = tensorpress.runtime.load(artifact)
    model.generate(prompt, max_new_tokens=4, stop_ids=[])  # warm-up
    for _ in range(repeats):
        tokens = model.generate(prompt, max_new_tokens=new_tokens, stop_ids=[])
        rates.append(model.last_stats.decode_tokens_per_second)
else:
    import torch, transformers
    torch.set_num_threads(int(sys.argv[7]))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for r in range(repeats + 1):
            out = model(input_ids=ids, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            tokens, seconds = [int(token)], 0.0
            for _ in range(new_tokens - 1):
                start = time.perf_counter()
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                seconds += time.perf_counter() - start
                tokens.append(int(token))
            if r:  # the first run warms up
                rates.append((new_tokens - 1) / seconds)
print(json.dumps({"tokens_per_s": max(rates), "tokens": tokens}))
"""


def measure(side: str, folder: Path, artifact: Path, args, env: dict[str, str]) -> dict:
    command = [sys.executable, "-c", MEASURE, side, str(folder), str(artifact)]
    command += [str(args.prompt_tokens), str(args.new_tokens), str(REPEATS), str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{side} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def start_load() -> list[subprocess.Popen]:
    loads = [subprocess.Popen([sys.executable, "-c", LOAD_LOOP]) for _ in range(LOAD_PROCESSES)]
    time.sleep(3.0)  # torch imported, loops running
    return loads


def stop_load(loads: list[subprocess.Popen]) -> None:
    for process in loads:
        process.terminate()
    for process in loads:
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random-llama", default="256x4", help="HIDDENxLAYERS of the random Llama (default 256x4)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch's threads")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for tensorpress' process")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch
    import transformers

    import tensorpress

    sys.path.insert(0, str(HERE))
    from decode_throughput_cpu import git_commit, random_llama

    extra = dict(item.split("=", 1) for item in args.env)
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ours_env = {**base_env, **extra}
    if extra:  # settings given here are the user's, not defaults inherited from this process
        ours_env.pop("TENSORPRESS_THREAD_POOL_DEFAULTS", None)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="tp-load-") as tmp:
        folder = random_llama(args.random_llama, Path(tmp) / "model")
        artifact = Path(tmp) / "model.tpk"
        tensorpress.compile(folder, artifact, target="cpu", dtype="float32")
        same = True
        for condition in ("idle", "loaded"):
            loads = start_load() if condition == "loaded" else []
            try:
                ours = measure("tensorpress", folder, artifact, args, ours_env)
                theirs = measure("transformers", folder, artifact, args, base_env)
            finally:
                stop_load(loads)
            same = same and ours["tokens"] == theirs["tokens"]
            rows[condition] = {"tensorpress": ours["tokens_per_s"], "transformers": theirs["tokens_per_s"]}
            print(
                f"{condition:7s} tensorpress {ours['tokens_per_s']:8.1f} tok/s   "
                f"transformers {theirs['tokens_per_s']:8.1f} tok/s",
                flush=True,
            )
    kept = {side: rows["loaded"][side] / rows["idle"][side] for side in ("tensorpress", "transformers")}
    print(f"loaded/idle: tensorpress {kept['tensorpress']:.2f}, transformers {kept['transformers']:.2f}")
    result = {
        "benchmark": "decode_under_load_cpu",
        "model": f"random Llama {args.random_llama}",
        "dtype": "float32",
        "batch": 1,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "load": f"{LOAD_PROCESSES} processes, each a {LOAD_THREADS}-thread torch 512x512 matmul loop",
        "tensorpress_env": extra,
        "torch_threads": args.threads,
        "tokens_per_s": {k: {s: round(v, 1) for s, v in row.items()} for k, row in rows.items()},
        "loaded_over_idle": {side: round(v, 3) for side, v in kept.items()},
        "goal_met": kept["tensorpress"] >= 0.25 and rows["loaded"]["tensorpress"] > rows["loaded"]["transformers"],
        "greedy_tokens_equal": same,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)),
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),  # others' work on a shared machine
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
