"""Accumulators of a linear layer's input activations X [tokens, K], folded sample by sample.

Any object with `update(x: np.ndarray)` can be handed to `collect_linear_inputs`; this is the one the
pruners and the activation-aware scale search read.
"""

from __future__ import annotations

import numpy as np

from tensorpress.errors import TensorpressError


class LinearInputStatistics:
    """tokens, sum of squares per input channel, and the Gram matrix X^T X, in float64."""

    def __init__(self, k: int):
        self.k = k
        self.tokens = 0
        self.sq_sum = np.zeros(k, dtype=np.float64)
        self.gram = np.zeros((k, k), dtype=np.float64)

    def update(self, x: np.ndarray) -> None:
        """Fold in activations x [..., K] (leading axes are tokens)."""
        x = np.asarray(x)
        if x.shape[-1] != self.k:
            raise TensorpressError(f"a linear layer's input has {x.shape[-1]} channels where {self.k} were expected.")
        x = x.reshape(-1, self.k).astype(np.float64)
        if not np.isfinite(x).all():
            raise TensorpressError("the calibration run produced inf or NaN activations; check the calibration inputs.")
        self.tokens += x.shape[0]
        self.sq_sum += np.einsum("tk,tk->k", x, x)
        self.gram += x.T @ x

    @property
    def channel_norms(self) -> np.ndarray:
        """float64 [K]: ||X_j||_2 over every calibration token (Wanda's activation norm)."""
        return np.sqrt(self.sq_sum)
