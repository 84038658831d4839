"""2-bit key quality on synthetic keys (numpy only): attention-probability KL divergence from full
precision for int2 per-token (naive), Hadamard-only rotation (per-token 2-bit after H, QuaRot-style; and
with int2-oscar's 96 % clip), KIVI-style per-channel without boost, int2-kitty at boost fractions 0.125 and
0.25, and int2-oscar (R_K calibrated on 256 held-out queries of the same distribution, 96 % clip), per seed.

The keys, queries and the baselines are the ones `tests/compiler/formats/test_kv_int2_kitty.py` and
`test_kv_int2_oscar.py` assert the order on (keys with 8 outlier channels and a sink token that draws about
half the attention, 512 tokens = 4 pages of 128, head_dim 128; the sink stays full precision in every
method). The generator's queries are N(0, I) plus a pull to the sink: nearly isotropic, so a calibrated
eigenbasis has little to find on them.

    .venv/bin/python benchmarks/kv_int2_kitty_quality.py [--seeds 10]

Writes JSON (default benchmarks/results/kv_int2_kitty_quality_synthetic.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kv_int2_kitty_quality_synthetic.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests" / "compiler" / "formats"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import numpy as np
    import test_kv_int2_kitty as synthetic
    import test_kv_int2_oscar as rotated
    from harness import environment, write_json

    from tensorpress.compiler.calibration.kv_rotations import hadamard, rotation_from_covariance
    from tensorpress.compiler.formats import kv_int2_oscar
    from tensorpress.compiler.formats.kv_int2_kitty import bits_per_element

    D = synthetic.D
    per_seed = []
    for seed in range(args.seeds):
        keys, queries = synthetic.synthetic_keys(seed)
        rng = np.random.default_rng(1000 + seed)  # held-out calibration queries, as the test draws them
        held_out = rng.standard_normal((256, D)) + 0.15 * keys[0] / np.linalg.norm(keys[0]) * np.sqrt(D)
        r_k = rotation_from_covariance(held_out.T @ held_out)
        methods = {
            "int2_per_token": synthetic.per_token_int2,
            "int2_hadamard_only": lambda k: rotated._rotated(k, hadamard(D), None),
            "int2_hadamard_clip96": lambda k: rotated._rotated(k, hadamard(D), 0.96),
            "int2_per_channel_no_boost": synthetic.per_channel_int2_pages,
            "int2_kitty_f0.125": lambda k: synthetic.kitty(k, 0.125),
            "int2_kitty_f0.25": lambda k: synthetic.kitty(k, 0.25),
            "int2_oscar": lambda k, r=r_k: rotated._rotated(k, r, 0.96),
        }
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
        "environment": environment(),
        "metric": "mean over 64 queries of KL(softmax(qK/sqrt(D)) || softmax(qK_hat/sqrt(D)))",
        "bits_per_element_kitty": {f: bits_per_element(128, 128, f) for f in (0.0, 0.125, 0.25)},
        "bits_per_element_oscar": kv_int2_oscar.bits_per_element(128),
        "mean_kl": summary,
        "order_holds_every_seed": all(
            r["int2_per_token"] > r["int2_hadamard_only"] > r["int2_per_channel_no_boost"] > r["int2_kitty_f0.25"]
            for r in per_seed
        ),
        "oscar_below_hadamard_only_every_seed": all(r["int2_oscar"] < r["int2_hadamard_only"] for r in per_seed),
        "oscar_below_hadamard_with_the_same_clip_seeds": sum(
            r["int2_oscar"] < r["int2_hadamard_clip96"] for r in per_seed
        ),
        "per_seed": per_seed,
    }
    write_json(args.out, payload)
    print("mean KL: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
