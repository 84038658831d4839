"""int2-kitty page quality on synthetic keys (numpy only): attention-probability KL divergence from full
precision for int2 per-token (naive), KIVI-style per-channel without boost, and int2-kitty at boost
fractions 0.125 and 0.25, per seed.

The keys, queries and the two baselines are the ones `tests/compiler/formats/test_kv_int2_kitty.py`
asserts the order on (keys with 8 outlier channels and a sink token that draws about half the attention,
512 tokens = 4 pages of 128, head_dim 128; the sink stays full precision in every method).

    .venv/bin/python benchmarks/kv_int2_kitty_quality.py [--seeds 10]

Writes JSON (default benchmarks/results/kv_int2_kitty_quality_synthetic.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kv_int2_kitty_quality_synthetic.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests" / "compiler" / "formats"))
    import numpy as np
    import test_kv_int2_kitty as synthetic

    from tensorpress.compiler.formats.kv_int2_kitty import bits_per_element

    methods = {
        "int2_per_token": synthetic.per_token_int2,
        "int2_per_channel_no_boost": synthetic.per_channel_int2_pages,
        "int2_kitty_f0.125": lambda k: synthetic.kitty(k, 0.125),
        "int2_kitty_f0.25": lambda k: synthetic.kitty(k, 0.25),
    }
    per_seed = []
    for seed in range(args.seeds):
        keys, queries = synthetic.synthetic_keys(seed)
        row = {"seed": seed}
        for name, method in methods.items():
            quantised = keys.copy()
            quantised[1:] = method(keys[1:])
            row[name] = synthetic.attention_kl(keys, quantised, queries)
        per_seed.append(row)
        print("  ".join(f"{k} {v:.4g}" if k != "seed" else f"seed {v}" for k, v in row.items()))
    summary = {name: float(np.mean([r[name] for r in per_seed])) for name in methods}
    payload = {
        "benchmark": "kv_int2_kitty_quality_synthetic",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "metric": "mean over 64 queries of KL(softmax(qK/sqrt(D)) || softmax(qK_hat/sqrt(D)))",
        "bits_per_element_kitty": {f: bits_per_element(128, 128, f) for f in (0.0, 0.125, 0.25)},
        "mean_kl": summary,
        "order_holds_every_seed": all(
            r["int2_per_token"] > r["int2_per_channel_no_boost"] > r["int2_kitty_f0.25"] for r in per_seed
        ),
        "per_seed": per_seed,
    }
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    print("mean KL: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
