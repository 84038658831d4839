"""Pruning: the zeros a sparse weight format then stores for free (`SparseConfig`, `--sparsity`).

    w_pruned = prune(w, sparsity=0.8, method="magnitude")    # float W[M, K] -> the same, with zeros

"magnitude": per output row (a row of W[M, K]), the floor(sparsity * K) weights of smallest |w| become
zero, the largest (1 - sparsity) are kept as they are (ties: the lower column index is pruned first).
"none": the weights as given (models that arrive already pruned). "wanda" and "sparsegpt" need
calibration activations, which are not built yet. Pure numpy; the pipeline prunes each linear weight a
sparse format stores, right before packing it.
"""

from __future__ import annotations

import numpy as np

from tensorpress.errors import ConfigError

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "none")
BUILT_PRUNE_METHODS = ("magnitude", "none")


def check_prune_method(method: str) -> None:
    """ConfigError unless `method` is a pruning method compile can carry out now."""
    if method not in PRUNE_METHODS:
        raise ConfigError(f"unknown pruning method {method!r}; valid methods: {', '.join(PRUNE_METHODS)}.")
    if method not in BUILT_PRUNE_METHODS:
        raise ConfigError(f"pruning with {method} needs calibration, not built yet; use magnitude or none.")


def check_sparsity(sparsity: object, what: str = "sparsity") -> float:
    """`sparsity` as a float in [0, 1), or a ConfigError saying so."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ConfigError(f"{what} must be a number in [0, 1) (the fraction of zeros), got {sparsity!r}.")
    return float(sparsity)


def prune(w: np.ndarray, sparsity: float, method: str = "magnitude") -> np.ndarray:
    """A copy of W[M, K] pruned to `sparsity` per output row by `method` (see the module docstring)."""
    check_prune_method(method)
    sparsity = check_sparsity(sparsity)
    w = np.array(w, copy=True)
    if method == "none" or w.size == 0:
        return w
    dropped = int(np.floor(sparsity * w.shape[1]))
    if dropped == 0:
        return w
    order = np.argsort(np.abs(w), axis=1, kind="stable")[:, :dropped]
    np.put_along_axis(w, order, 0, axis=1)
    return w
