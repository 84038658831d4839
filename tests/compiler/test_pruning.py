"""Wanda and SparseGPT (compiler/pruning.py) against independent references: Wanda's mask by torch's
topk of |W| * ||X_j||; SparseGPT by a brute-force OBS written with direct linear solves (no Cholesky
factor, no blocked updates); and on random activations with outlier channels, the layer output error
orders sparsegpt < wanda < magnitude at the same sparsity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tensorpress.compiler.calibration import LinearInputStatistics
from tensorpress.compiler.pruning import dampened_hessian, least_squares_refit, prune, sparsegpt
from tensorpress.errors import ConfigError, TensorpressError


def outlier_activations(tokens: int, k: int, seed: int) -> np.ndarray:
    """Activations where a few input channels are 20x larger (as in LLMs), correlated across channels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k))
    x[:, rng.choice(k, size=max(1, k // 16), replace=False)] *= 20.0
    return x


def stats_of(x: np.ndarray) -> LinearInputStatistics:
    stats = LinearInputStatistics(x.shape[1])
    stats.update(x)
    return stats


def output_error(w: np.ndarray, w_pruned: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm((w - w_pruned) @ x.T))


def test_wanda_is_torch_topk_of_weight_times_input_norm():
    x = outlier_activations(300, 96, seed=1)
    w = np.random.default_rng(2).standard_normal((40, 96)).astype(np.float32)
    for sparsity in (0.5, 0.7):
        got = prune(w, sparsity, "wanda", stats_of(x))
        score = torch.from_numpy(w).abs() * torch.from_numpy(x).norm(dim=0)[None, :]
        keep = 96 - int(np.floor(sparsity * 96))
        mask = torch.zeros(w.shape, dtype=torch.bool).scatter_(1, torch.topk(score, keep, dim=1).indices, True)
        np.testing.assert_array_equal(got, np.where(mask.numpy(), w, 0))
        assert got.dtype == np.float32


def reference_sparsegpt(w: np.ndarray, sparsity: float, h: np.ndarray, block: int) -> np.ndarray:
    """OBS column by column, brute force: at each block start each row's mask in the block keeps the
    weights of largest w_j^2 / [(H_{>=j,>=j})^-1]_00; pruning w_j then moves the columns right of j to
    the exact minimiser of d H d^T with d_{<j} = 0 and d_j = w_j (a linear solve per pruned weight)."""
    w = w.astype(np.float64).copy()
    m, k = w.shape
    inv_diag = np.array([np.linalg.inv(h[j:, j:])[0, 0] for j in range(k)])
    zeros_before = 0
    for start in range(0, k, block):
        end = min(start + block, k)
        count = int(np.floor(sparsity * end)) - zeros_before
        zeros_before += count
        for row in range(m):
            saliency = w[row, start:end] ** 2 / inv_diag[start:end]
            pruned = start + np.argsort(saliency, kind="stable")[:count]
            for j in sorted(pruned):
                rest = slice(j + 1, k)
                w[row, rest] += np.linalg.solve(h[rest, rest], h[rest, j]) * w[row, j]
                w[row, j] = 0.0
    return w


@pytest.mark.parametrize("block", [4, 7, 64])
def test_sparsegpt_equals_a_brute_force_obs(block):
    x = outlier_activations(200, 24, seed=3)
    w = np.random.default_rng(4).standard_normal((6, 24))
    gram = x.T @ x
    got = sparsegpt(w, 0.5, gram, block=block, refit=False)
    want = reference_sparsegpt(w, 0.5, dampened_hessian(gram), block)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    assert ((got == 0).sum(axis=1) == 12).all()


def test_prune_sparsegpt_sweep_is_the_obs_sweep_alone():
    x = outlier_activations(200, 24, seed=3)
    w = np.random.default_rng(4).standard_normal((6, 24)).astype(np.float32)
    got = prune(w, 0.5, "sparsegpt-sweep", stats_of(x))
    want = reference_sparsegpt(w, 0.5, dampened_hessian(x.T @ x), block=128)
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-5, atol=1e-6)
    assert got.dtype == np.float32


def lstsq_refit(x: np.ndarray, w: np.ndarray, mask: np.ndarray, lam: float) -> np.ndarray:
    """Each row's kept weights minimising ||X (w' - w)||^2 + lam ||w' - w||^2: numpy lstsq of
    [X; sqrt(lam) I] restricted to the row's kept columns."""
    k = w.shape[1]
    a = np.vstack([x, np.sqrt(lam) * np.eye(k)])
    out = np.zeros_like(w)
    for row in range(w.shape[0]):
        kept = np.nonzero(mask[row])[0]
        out[row, kept] = np.linalg.lstsq(a[:, kept], a @ w[row], rcond=None)[0]
    return out


@pytest.mark.parametrize("reselect", [0, 1, 2])
def test_sparsegpt_refit_is_numpy_lstsq_on_the_raw_activations_for_its_mask(reselect):
    """lambda: the dampening added to H's diagonal. Without reselection the mask is the OBS sweep's."""
    x = outlier_activations(120, 40, seed=9)
    x[:, 3] = 0.0  # a channel no token uses: stays zero
    w = np.random.default_rng(10).standard_normal((7, 40))
    gram = x.T @ x
    got = sparsegpt(w, 0.5, gram, reselect=reselect)
    lam = 0.1 * float(np.mean(np.diag(dampened_hessian(gram, 0.0))))
    mask = got != 0
    if reselect == 0:
        np.testing.assert_array_equal(mask, sparsegpt(w, 0.5, gram, refit=False) != 0)
    target = np.where(np.arange(40) == 3, 0.0, w)
    want = lstsq_refit(x, target, mask, lam)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    assert (got[:, 3] == 0).all() and ((got == 0).sum(axis=1) == 20).all()


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_least_squares_refit_solvers_equal_numpy_lstsq(solver):
    x = outlier_activations(60, 48, seed=15)  # fewer tokens than channels, as with short calibrations
    w = np.random.default_rng(16).standard_normal((10, 48))
    gram = x.T @ x
    mask = np.random.default_rng(17).random((10, 48)) < 0.4
    mask[3] = False  # a row with nothing kept
    lam = 0.1 * float(np.mean(np.diag(gram)))
    got = least_squares_refit(w, mask, dampened_hessian(gram), solver=solver)
    want = lstsq_refit(x, w, mask, lam)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-8 * np.abs(want).max())
    assert (got[~mask] == 0).all()


def test_sparsegpt_reselection_rescores_each_row_by_obs_saliency_after_restoring_its_pruned_weights():
    """Brute force per row: every pruned weight set to its optimum with all others held (a 1-D least
    squares on the dampened objective), then keep the 20 of largest v_j^2 / [H^-1]_jj (np.linalg.inv)."""
    x = outlier_activations(150, 40, seed=13)
    w = np.random.default_rng(14).standard_normal((9, 40))
    gram = x.T @ x
    h = dampened_hessian(gram)
    fitted = sparsegpt(w, 0.5, gram, reselect=0)
    h_inv_diag = np.diag(np.linalg.inv(h))
    want = np.zeros(w.shape, dtype=bool)
    for row in range(9):
        v = fitted[row].copy()
        for j in np.nonzero(fitted[row] == 0)[0]:
            others = fitted[row].copy()
            others[j] = 0.0
            # minimise (o + t e_j - w)^T H (o + t e_j - w) over t
            v[j] = (h[j] @ (w[row] - others)) / h[j, j]
        want[row, np.argsort(-(v**2) / h_inv_diag, kind="stable")[:20]] = True
    got = sparsegpt(w, 0.5, gram, reselect=1)
    np.testing.assert_array_equal(got != 0, want)
    assert (want != (fitted != 0)).any()  # the reselection moved some weights


def test_sparsegpt_refit_lowers_the_dampened_output_error_of_the_obs_sweep():
    x = outlier_activations(400, 128, seed=11)
    w = np.random.default_rng(12).standard_normal((64, 128))
    h = dampened_hessian(x.T @ x)
    for sparsity in (0.5, 0.7):
        obs, refit = (sparsegpt(w, sparsity, x.T @ x, refit=flag) for flag in (False, True))
        error = {name: np.einsum("mk,kl,ml->", w - v, h, w - v) for name, v in (("obs", obs), ("refit", refit))}
        assert error["refit"] < error["obs"], error


def test_sparsegpt_gives_the_lowest_layer_output_error():
    x = outlier_activations(1024, 256, seed=5)
    w = np.random.default_rng(6).standard_normal((128, 256)).astype(np.float32)
    stats = stats_of(x)
    for sparsity in (0.5, 0.7):
        errors = {
            method: output_error(w, prune(w, sparsity, method, stats), x)
            for method in ("magnitude", "wanda", "sparsegpt")
        }
        assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
        for method in ("wanda", "sparsegpt"):
            zeros = (prune(w, sparsity, method, stats) == 0).sum(axis=1)
            assert (zeros == int(np.floor(sparsity * 256))).all()


def test_sparsegpt_leaves_channels_no_token_uses_at_zero_and_stays_finite():
    x = outlier_activations(64, 32, seed=7)
    x[:, 5] = 0.0
    w = np.random.default_rng(8).standard_normal((8, 32))
    got = prune(w, 0.5, "sparsegpt", stats_of(x))
    assert np.isfinite(got).all() and (got[:, 5] == 0).all()


def test_calibrated_methods_need_statistics():
    w = np.ones((4, 8), dtype=np.float32)
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(TensorpressError, match="no calibration statistics"):
            prune(w, 0.5, method)
    with pytest.raises(ConfigError, match="unknown pruning method"):
        prune(w, 0.5, "random")
