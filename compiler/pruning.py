"""Pruning: the zeros a sparse weight format then stores for free (`SparseConfig`, `--sparsity`).

    w_pruned = prune(w, sparsity=0.8, method="magnitude")            # float W[M, K] -> the same, with zeros
    w_pruned = prune(w, 0.5, "sparsegpt", stats)                     # stats: the layer's calibration

Every method leaves exactly floor(sparsity * K) zeros in each output row (a row of W[M, K]):
"magnitude": the weights of smallest |w| become zero, the others are kept as they are.
"wanda" (Sun et al. 2023): the smallest |w_ij| * ||X_j||_2, where ||X_j||_2 is the L2 norm of input
    channel j over the calibration tokens (`stats.channel_norms`); the others kept as they are.
"sparsegpt" (Frantar & Alistarh 2023): columns left to right in blocks of 128; at each block's start
    each row's mask in the block is chosen by w^2 / [H^-1]_jj^2 (the OBS saliency, with the inverse
    Hessian of the columns still free), and every pruned weight's error is spread over the row's
    columns to its right by the OBS update. That sweep only approximates the best kept weights for
    the mask it picks, so they are then refitted (`least_squares_refit`): each row's kept weights
    become the exact minimiser of (w' - w)^T H (w' - w) = ||X (w' - w)||^2 + dampening ||w' - w||^2,
    i.e. H_SS w'_S = (H w)_S: a direct solve per row, or CG to convergence where cheaper. Then
    SPARSEGPT_RESELECT_ROUNDS rounds of: each row's mask re-picked at the same count from the refitted
    weights (`reselected_mask`: the pruned weights restored to their best single value, then the OBS
    saliency w^2 / [H^-1]_jj), and refitted.
    H = X^T X + 10% of its mean diagonal (dampening), from `stats.gram`. Cost: the sweep ~M K^2 flops,
    a refit by CG ~100 steps of 2 M K^2 (`least_squares_refit`): a 4096 x 4096 layer at 50% from 512 tokens, on 2
    shared cores (load 3.7), took 25 s to sweep, then ~230 s a refit (CG, 80 steps; direct LU ~900 s),
    ~490 s in all (benchmarks/results/sparsegpt_layer_cost_cpu.json), hence
"sparsegpt-sweep": the OBS sweep alone, as in the paper (no refit, no reselection), for such layers.
    MiniLM (204 calibration lines), min cosine of ten held-out sentences, sparsegpt-sweep -> sparsegpt:
    0.897 -> 0.928 at 50%, 0.672 -> 0.770 at 70% (benchmarks/results/calibrated_quality_minilm_cpu.json).
"none": the weights as given (models that arrive already pruned).
Ties go to the lower column index. Pure numpy (float64 for sparsegpt); the pipeline prunes each linear
weight a sparse format stores, right before packing it.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from tensorpress.errors import ConfigError, TensorpressError

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "sparsegpt-sweep", "none")
CALIBRATED_PRUNE_METHODS = ("wanda", "sparsegpt", "sparsegpt-sweep")  # they read the layer's input activations
# Columns whose masks are chosen at once. On MiniLM at 50% with the refit converged, min cosine of the ten
# held-out sentences: 0.854 at 32, 0.868 at 64, 0.884 at 128, 0.878 at 256, 0.878 with the whole row as one block.
SPARSEGPT_BLOCK = 128
# Of the mean of H's diagonal, added to it. The paper's 1% assumes 128 x 2048 calibration tokens; with a
# few hundred (fewer than K: X^T X is rank-deficient) the OBS update overfits them. On MiniLM at 50%
# over 48 lines, the min cosine of ten held-out sentences was 0.817 at 1%, 0.860 at 10%, 0.868 at 30%
# with the OBS sweep alone; with the least-squares refit converged (where it is also the ridge pulling the
# kept weights to their old values) 0.862 at 3%, 0.883 at 10%, 0.876 at 30%. Over 204 lines with the refit and
# one reselection round (torch-hook run): 0.928 at 3%, 0.929 at 10%.
SPARSEGPT_DAMPENING = 0.1
# Rounds of mask reselection after the first refit (`reselected_mask`). MiniLM at 50%, 204 calibration lines, min
# cosine of the ten held-out sentences (torch-hook run): 0.919 without, 0.9289 with one round, 0.9293 with two.
SPARSEGPT_RESELECT_ROUNDS = 1
# CG steps a refit may take, and those it is assumed to take when choosing between CG and direct solves.
REFIT_CG_STEPS = 300
REFIT_CG_STEPS_EXPECTED = 100
# Elements of the stack of H_SS matrices the refit solves at once (8 bytes each: 256 MiB).
REFIT_STACK_ELEMENTS = 1 << 25


class LayerInputStatistics(Protocol):
    """What the calibrated methods read of a layer's input X [tokens, K] (`compiler/calibration/`)."""

    @property
    def channel_norms(self) -> np.ndarray: ...  # float64 [K]: ||X_j||_2

    @property
    def gram(self) -> np.ndarray: ...  # float64 [K, K]: X^T X


def check_prune_method(method: str, calibrated: bool = True) -> None:
    """ConfigError unless `method` is a pruning method; `calibrated` says whether calibration data is given."""
    if method not in PRUNE_METHODS:
        raise ConfigError(f"unknown pruning method {method!r}; valid methods: {', '.join(PRUNE_METHODS)}.")
    if method in CALIBRATED_PRUNE_METHODS and not calibrated:
        raise ConfigError(
            f"pruning with {method} needs calibration data; give --calibration FILE (an .npz of model "
            "inputs or a .txt of text), or use --prune magnitude."
        )


def check_sparsity(sparsity: object, what: str = "sparsity") -> float:
    """`sparsity` as a float in [0, 1), or a ConfigError saying so."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ConfigError(f"{what} must be a number in [0, 1) (the fraction of zeros), got {sparsity!r}.")
    return float(sparsity)


def prune(
    w: np.ndarray, sparsity: float, method: str = "magnitude", stats: LayerInputStatistics | None = None
) -> np.ndarray:
    """A copy of W[M, K] pruned to `sparsity` per output row by `method` (see the module docstring);
    `stats` are the statistics of the layer's input, which wanda and sparsegpt need."""
    check_prune_method(method)
    sparsity = check_sparsity(sparsity)
    w = np.array(w, copy=True)
    if method == "none" or w.size == 0 or int(np.floor(sparsity * w.shape[1])) == 0:
        return w
    if method in CALIBRATED_PRUNE_METHODS and stats is None:
        raise TensorpressError(f"pruning with {method} was given no calibration statistics for this layer.")
    if method in ("sparsegpt", "sparsegpt-sweep"):
        assert stats is not None
        return sparsegpt(w, sparsity, stats.gram, refit=method == "sparsegpt").astype(w.dtype)
    score = np.abs(w)
    if method == "wanda":
        assert stats is not None
        score = score * _checked(stats.channel_norms, (w.shape[1],), "channel norms")[None, :]
    return _zero_lowest(w, score, int(np.floor(sparsity * w.shape[1])))


def _zero_lowest(w: np.ndarray, score: np.ndarray, dropped: int) -> np.ndarray:
    order = np.argsort(score, axis=1, kind="stable")[:, :dropped]
    np.put_along_axis(w, order, 0, axis=1)
    return w


def dampened_hessian(gram: np.ndarray, dampening: float = SPARSEGPT_DAMPENING) -> np.ndarray:
    """H = X^T X + dampening * mean(diag) * I, float64; a channel no token ever used (diag 0) gets 1 on
    the diagonal, so H is invertible (such a channel's weights never change the output)."""
    h = np.array(gram, dtype=np.float64, copy=True)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += dampening * float(np.mean(np.diag(h)))
    return h


def sparsegpt(
    w: np.ndarray,
    sparsity: float,
    gram: np.ndarray,
    block: int = SPARSEGPT_BLOCK,
    dampening: float = SPARSEGPT_DAMPENING,
    refit: bool = True,
    reselect: int = SPARSEGPT_RESELECT_ROUNDS,
) -> np.ndarray:
    """float64 W[M, K] pruned by SparseGPT (module docstring): floor(sparsity * K) zeros per row, the
    kept weights updated so that ||(W - W') X^T|| stays small, X^T X = `gram` [K, K]. `refit`: re-solve
    the kept weights by least squares after the OBS sweep (False: the sweep alone, as the paper), then
    `reselect` rounds of each row's mask re-picked from the refitted weights (`reselected_mask`) and refitted."""
    m, k = w.shape
    gram = _checked(gram, (k, k), "input Gram matrix")
    h = dampened_hessian(gram, dampening)
    w = np.array(w, dtype=np.float64, copy=True)
    original = w.copy()
    dead = np.diag(np.asarray(gram)) == 0
    w[:, dead] = 0.0  # channels that are always zero: any value is free
    # Upper Cholesky factor U of H^-1 (H^-1 = U^T U): row i, from the diagonal on, is the OBS update of
    # column i with the columns >= i still free, divided by sqrt([H_{>=i}^-1]_00) = U_ii.
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    done_zeros = 0
    keep = np.broadcast_to(~dead, w.shape).copy()
    for start in range(0, k, block):
        end = min(start + block, k)
        target = int(np.floor(sparsity * end))  # zeros per row in columns [0, end): exactly floor(s*K) at the end
        count, done_zeros = target - done_zeros, target
        u_block = u[start:end, start:end]
        cols = w[:, start:end]  # a view: updated in place
        err = np.zeros((m, end - start))
        mask = np.zeros(cols.shape, dtype=bool)
        if count > 0:
            saliency = cols**2 / np.diag(u_block)[None, :] ** 2
            np.put_along_axis(mask, np.argsort(saliency, axis=1, kind="stable")[:, :count], True, axis=1)
        keep[:, start:end] &= ~mask
        for i in range(end - start):
            col = cols[:, i]
            pruned = np.where(mask[:, i], 0.0, col)
            err[:, i] = (col - pruned) / u_block[i, i]
            cols[:, i:] -= err[:, i : i + 1] * u_block[i : i + 1, i:]
            cols[:, i] = pruned
        w[:, end:] -= err @ u[start:end, end:]
    if refit:
        original[:, dead] = 0.0
        w = least_squares_refit(original, keep, h, start=w)
        inverse_diagonal = np.einsum("ij,ij->j", u, u)  # diag(H^-1) = diag(U^T U)
        for _ in range(reselect):
            keep = reselected_mask(original, w, keep, h, inverse_diagonal, dead)
            w = least_squares_refit(original, keep, h, start=w)
    return w


def reselected_mask(
    w: np.ndarray, fitted: np.ndarray, keep: np.ndarray, h: np.ndarray, inverse_diagonal: np.ndarray, dead: np.ndarray
) -> np.ndarray:
    """Each row's mask re-picked at its count of kept weights from `fitted` (the least-squares weights of
    mask `keep`, target `w`): every pruned weight first takes its best value with the others held,
    fitted_j + [H (w - fitted)]_j / H_jj, then the row keeps the weights of largest OBS saliency
    v_j^2 / [H^-1]_jj. Ties go to the lower column index; channels no token uses stay pruned."""
    restored = fitted + np.where(keep, 0.0, (w - fitted) @ h / np.diag(h)[None, :])
    saliency = np.where(dead[None, :], -np.inf, restored**2 / inverse_diagonal[None, :])
    order = np.argsort(-saliency, axis=1, kind="stable")
    chosen = np.arange(keep.shape[1])[None, :] < keep.sum(axis=1)[:, None]  # the first `count` of each row
    new = np.zeros_like(keep)
    np.put_along_axis(new, order, chosen, axis=1)
    return new


def least_squares_refit(
    w: np.ndarray, keep: np.ndarray, h: np.ndarray, start: np.ndarray | None = None, solver: str | None = None
) -> np.ndarray:
    """float64 W'[M, K], zero where `keep` is False, each row's kept weights the exact minimiser of
    (w' - w)^T H (w' - w) = ||X (w' - w)||^2 + dampening ||w' - w||^2 for its mask: H_SS w'_S = (H w)_S.
    `solver`: "direct" (`direct_refit`, 2/3 |S|^3 flops a row) or "cg" (`conjugate_gradient_refit`,
    2 K^2 a row and step, to convergence); None: direct where it costs at most REFIT_CG_STEPS_EXPECTED
    steps of CG (MiniLM's layers), else CG (a 4096 x 4096 layer from 512 tokens: converged in 80 steps
    from the sweep's weights, ~230 s against ~900 s direct). `start`: where CG starts (zero if None)."""
    if solver is None:
        kept = float(keep.sum(axis=1).max(initial=0))
        solver = "direct" if 2 / 3 * kept**3 <= REFIT_CG_STEPS_EXPECTED * 2 * w.shape[1] ** 2 else "cg"
    if solver == "cg":
        return conjugate_gradient_refit(w, keep, h, start)
    return direct_refit(w, keep, h)


def conjugate_gradient_refit(
    w: np.ndarray, keep: np.ndarray, h: np.ndarray, start: np.ndarray | None = None, tolerance: float = 1e-10
) -> np.ndarray:
    """`least_squares_refit` by Jacobi-preconditioned conjugate gradients, every row at once (one [M, K] x
    [K, K] product a step), from `start` (zero if None) until each row's residual is `tolerance` of its first (at most
    REFIT_CG_STEPS): converged, so that the weights do not follow the calibration's last rounding."""
    keep = keep.astype(np.float64)
    x = np.zeros_like(w) if start is None else start * keep
    r = (w - x) @ h * keep  # minus the gradient, masked: the residual of H_SS x_S = (H w)_S
    inv_diag = 1.0 / np.diag(h)[None, :]
    z = r * inv_diag
    p = z.copy()
    rz = np.einsum("mk,mk->m", r, z)
    first = np.einsum("mk,mk->m", r, r)
    tiny = np.finfo(np.float64).tiny
    for _ in range(REFIT_CG_STEPS):
        if (np.einsum("mk,mk->m", r, r) <= tolerance**2 * first).all():
            break
        hp = p @ h * keep
        alpha = rz / np.maximum(np.einsum("mk,mk->m", p, hp), tiny)
        x += alpha[:, None] * p
        r -= alpha[:, None] * hp
        z = r * inv_diag
        rz_next = np.einsum("mk,mk->m", r, z)
        p = z + (rz_next / np.maximum(rz, tiny))[:, None] * p
        rz = rz_next
    return x


def direct_refit(w: np.ndarray, keep: np.ndarray, h: np.ndarray) -> np.ndarray:
    """`least_squares_refit` by a direct solve per row (LU), rows with as many kept weights in one stack."""
    from threadpoolctl import threadpool_limits

    b = w @ h
    out = np.zeros_like(b)
    counts = keep.sum(axis=1)
    # One BLAS thread: a stack of LU solves in threaded OpenBLAS ran 100x slower on a loaded 2-core machine
    # (256 x 256: 560 ms a system against 4 ms single-threaded).
    with threadpool_limits(limits=1, user_api="blas"):
        for count in np.unique(counts[counts > 0]).tolist():
            rows = np.nonzero(counts == count)[0]
            stack = max(1, REFIT_STACK_ELEMENTS // count**2)
            for first in range(0, len(rows), stack):
                chunk = rows[first : first + stack]
                kept = np.nonzero(keep[chunk])[1].reshape(len(chunk), count)  # each row's kept columns, ascending
                h_kept = h[kept[:, :, None], kept[:, None, :]]
                solved = np.linalg.solve(h_kept, np.take_along_axis(b[chunk], kept, axis=1)[:, :, None])[:, :, 0]
                block = np.zeros((len(chunk), w.shape[1]))
                np.put_along_axis(block, kept, solved, axis=1)
                out[chunk] = block
    return out


def _checked(array: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    if array.shape != shape or not np.isfinite(array).all():
        raise TensorpressError(f"the layer's {what} must be finite of shape {list(shape)}, got {list(array.shape)}.")
    return array
