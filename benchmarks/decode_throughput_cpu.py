"""CPU decode throughput: the compiled decoder vs transformers eager, same model, same process.

For each batch size B, both generate greedily from B prompts of P tokens. Decode throughput counts
the tokens produced by decode steps only (prefill excluded): for tensorpress from the runtime's own
timers (`model.last_stats`: the host work of each step included), for transformers by timing each
step of its KV-cached greedy loop (the model call and the argmax, as in generate()).
Both use the same number of threads and their default thread-pool settings; each figure is the best of
5 runs (the machine may be shared). The continuations are also compared token for token (greedy).

    .venv/bin/python benchmarks/decode_throughput_cpu.py                       # examples/tiny_llama
    .venv/bin/python benchmarks/decode_throughput_cpu.py --model path/to/hf_folder --batch 1 4 16
    .venv/bin/python benchmarks/decode_throughput_cpu.py --random-llama 512x8   # hidden x layers

Writes JSON (default benchmarks/results/decode_throughput_cpu.json) with machine, versions and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import transformers

import tensorpress
from tensorpress.runtime.decoder import DecoderModel

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "decode_throughput_cpu.json"
DEFAULT_MODEL = HERE.parent / "examples" / "tiny_llama"
REPEATS = 5  # best of: the machine is shared, the fastest run is the least disturbed one


def random_llama(spec: str, folder: Path) -> Path:
    hidden, layers = (int(x) for x in spec.split("x"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=2048,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@torch.no_grad()
def hf_decode_run(model, prompts: torch.Tensor, new_tokens: int) -> tuple[float, list[list[int]]]:
    """transformers' own KV-cached greedy loop (what generate() runs); seconds of the decode steps only."""
    out = model(input_ids=prompts, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    tokens, seconds = [token], 0.0
    for _ in range(new_tokens - 1):
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        seconds += time.perf_counter() - start
        tokens.append(token)
    return seconds, torch.cat(tokens, 1).tolist()


def ours_decode_run(model: DecoderModel, prompts: list[list[int]], new_tokens: int):
    tokens = model.generate(prompts, max_new_tokens=new_tokens, stop_ids=[])
    return model.last_stats.decode_seconds, tokens


def decode_rates(ours: DecoderModel, theirs, prompts: np.ndarray, new_tokens: int):
    """Best-of-REPEATS decode tokens/s of both. The sides run one after the other with a pause between:
    each thread pool (TVM's, torch's libgomp) spins for a while after its work, and interleaved runs
    let one pool's spinning steal the cores from the other's next steps."""
    runs = {}
    for side, run, batch in (
        ("ours", ours_decode_run, (ours, prompts.tolist())),
        ("hf", hf_decode_run, (theirs, torch.from_numpy(prompts))),
    ):
        time.sleep(0.5)
        run(*batch, 2)  # warm-up
        runs[side] = [run(*batch, new_tokens) for _ in range(REPEATS)]
    decoded = prompts.shape[0] * (new_tokens - 1)
    ours_best, hf_best = (min(seconds for seconds, _ in runs[side]) for side in ("ours", "hf"))
    return decoded / ours_best, decoded / hf_best, runs["ours"][0][1], runs["hf"][0][1]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a Hugging Face Llama/Qwen2/OPT folder")
    parser.add_argument("--random-llama", help="benchmark a random Llama instead: HIDDENxLAYERS, e.g. 512x8")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help=f"JSON file (default {RESULTS.name} in results/)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))

    with tempfile.TemporaryDirectory(prefix="tp-bench-") as tmp:
        folder = random_llama(args.random_llama, Path(tmp) / "model") if args.random_llama else args.model
        artifact = Path(tmp) / "model.tpk"
        start = time.perf_counter()
        tensorpress.compile(folder, artifact, target="cpu", dtype="float32")
        compile_seconds = time.perf_counter() - start
        ours = tensorpress.runtime.load(artifact)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        vocab = theirs.config.vocab_size
        rows = []
        for batch in args.batch:
            rng = np.random.default_rng(batch)
            prompts = rng.integers(3, vocab, (batch, args.prompt_tokens))
            ours_rate, hf_rate, ours_tokens, hf_tokens = decode_rates(ours, theirs, prompts, args.new_tokens)
            same = sum(a == b for a, b in zip(ours_tokens, hf_tokens))
            rows.append(
                {
                    "batch": batch,
                    "tensorpress_tokens_per_s": round(ours_rate, 1),
                    "transformers_tokens_per_s": round(hf_rate, 1),
                    "speedup": round(ours_rate / hf_rate, 2),
                    "greedy_sequences_equal": f"{same}/{batch}",
                }
            )
            print(
                f"batch {batch:3d}: tensorpress {ours_rate:8.1f} tok/s   transformers {hf_rate:8.1f} tok/s   "
                f"x{ours_rate / hf_rate:5.2f}   greedy equal {same}/{batch}",
                flush=True,
            )
    config = theirs.config
    result = {
        "benchmark": "decode_throughput_cpu",
        "model": args.random_llama and f"random Llama {args.random_llama}" or str(args.model),
        "architecture": config.architectures[0] if config.architectures else type(theirs).__name__,
        "weights": sum(p.numel() for p in theirs.parameters()),
        "dtype": "float32",
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "compile_seconds": round(compile_seconds, 1),
        "rows": rows,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),  # a shared machine is noisy
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = args.out or (
        RESULTS.with_name(f"decode_throughput_cpu_random_llama_{args.random_llama}.json")
        if args.random_llama
        else RESULTS
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
