"""The README's main job: compile the bundled example model with FP6 weights, then generate text with it.

    ./dev.sh demo                  (or: .venv/bin/python examples/demo.py [--weights fp5] [--device cpu])

The model is examples/tiny_llama/, a small Llama trained on the CPU on the docstrings of Python's
standard library (examples/train_tiny_llama.py). The demo compiles it twice, dense and with
compressed weights, for the GPU when one is visible and for the CPU otherwise, then greedily continues
a prompt with both and prints what it did: sizes, times, tokens/s, and how far the compressed model's
tokens follow the dense one's.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = HERE / "tiny_llama"
OUT = HERE.parent / "out" / "demo"
PROMPT = "Return a new list containing"
# Text the model never saw (not a standard-library docstring), to score each build by perplexity.
UNSEEN = "This function returns the number of items in the list. If the list is empty, it raises an error."


def pick_target(device: str | None) -> tuple[str, str]:
    """(compile target, runtime device): the visible GPU when there is one, else the CPU."""
    from tensorpress.compiler.targets import visible_gpu_arch

    if device == "cpu":
        return "cpu", "cpu"
    arch = visible_gpu_arch()
    if arch is None:
        if device and device.startswith("cuda"):
            sys.exit("error: --device cuda asked for, but no NVIDIA GPU is visible (nvidia-smi).")
        return "cpu", "cpu"
    return f"cuda:{arch}", "cuda:0"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="fp6", help="weight format of the compressed build (default fp6)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when a GPU is visible)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()

    import numpy as np

    import tensorpress
    from tensorpress.runtime.inspect_artifact import size_vs_fp16

    target, device = pick_target(args.device)
    print(f"tensorpress {tensorpress.__version__}: demo on {device} (target {target}), model {MODEL}")
    OUT.mkdir(parents=True, exist_ok=True)
    builds = {}
    for label, weights in (("dense", None), (args.weights, args.weights)):
        path = OUT / f"tiny_llama_{label}_{target.replace(':', '_')}.tpk"
        print(f"  compiling {label} for {target} ...", flush=True)
        start = time.perf_counter()
        report = tensorpress.compile(MODEL, path, target=target, weights=weights)
        layers = report.manifest["layers"]
        stored = sum(layer["stored_bytes"] for layer in layers)
        fp16 = sum(layer["fp16_bytes"] for layer in layers)
        formats = sorted({layer["format"] for layer in layers})
        print(
            f"  compiled {label:>5}: {path.relative_to(HERE.parent)} ({path.stat().st_size / 1e6:.2f} MB) in "
            f"{time.perf_counter() - start:.1f} s; {len(layers)} linear layers ({', '.join(formats)}) hold "
            f"{stored / 1e6:.2f} MB ({size_vs_fp16(stored, fp16)})"
        )
        builds[label] = path

    results = {}
    for label, path in builds.items():
        model = tensorpress.runtime.load(path, device=device)
        start = time.perf_counter()
        tokens = model.generate(PROMPT, max_new_tokens=args.max_new_tokens)
        seconds = time.perf_counter() - start
        results[label] = tokens
        perplexity = math.exp(-float(np.mean(model.token_logprobs(UNSEEN))))
        print(
            f"\n[{label}] {len(tokens)} tokens in {seconds * 1e3:.0f} ms ({len(tokens) / seconds:.0f} tokens/s); "
            f"perplexity on unseen text {perplexity:.1f}"
        )
        print("  " + (PROMPT + model.decode_text(tokens)).replace("\n", "\n  "))
    dense, packed = results["dense"], results[args.weights]
    same = next((i for i, (a, b) in enumerate(zip(dense, packed)) if a != b), min(len(dense), len(packed)))
    print(f"\n{args.weights} follows the dense model's greedy tokens for the first {same} of {len(dense)}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
