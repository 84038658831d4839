"""Choosing the next token from one row of logits: greedy, or nucleus sampling with a temperature."""

from __future__ import annotations

import numpy as np


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator | None) -> int:
    """Pick a token from one row of logits [vocab]: argmax when temperature <= 0, else nucleus sampling."""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cut = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1  # smallest set with mass >= top_p
        kept = np.zeros_like(probs)
        kept[order[:cut]] = probs[order[:cut]]
        probs = kept / kept.sum()
    assert rng is not None
    return int(rng.choice(probs.shape[0], p=probs))
