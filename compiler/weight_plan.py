"""Recipe -> per-weight plan: which linear layer is stored in which format, and which stay generic.

The plan is what `inspect` shows and the manifest records: for every linear layer, the format it is
stored in (or why it is not compressed), its shape and the bytes stored against the dense fp16 bytes.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tensorpress.compiler.formats import (
    AUTO_SPARSE_FORMAT,
    WEIGHT_FORMATS,
    WeightFormat,
    dense_weight_format,
    get_weight_format,
)
from tensorpress.compiler.passes.rewrite_linear_to_weight_gemm import LayerChoice, LinearSite
from tensorpress.compiler.targets import TargetSpec

# Names that mark a layer as the LM head or an embedding (kept dense by default, as FP6-LLM does); a
# weight that another op reads too (an LM head tied to the embeddings) is kept dense whatever its name.
DEFAULT_SKIP = ("*lm_head*", "*embed*", "*wte*", "*wpe*")


@dataclass(frozen=True)
class WeightRecipe:
    """What the user asked for: a weight format name (None = dense), its scale search and skip patterns;
    for a sparse format, the sparsity each weight is pruned to and how (`compiler/pruning.py`)."""

    format: str | None = None  # or AUTO_SPARSE_FORMAT: chosen per layer (`choose_sparse_format`)
    scale_search: str = "absmax"
    skip: tuple[str, ...] = ()
    sparsity: float | None = None  # None: a sparse format stores the weights as given
    prune: str = "magnitude"
    # sparse x FPx: the eXmY of the nonzeros; auto then weighs the sparse formats holding them against it
    values: str | None = None


@dataclass(frozen=True)
class LayerPlan:
    weight: str
    shape: tuple[int, int]  # [M, K]
    format: str | None  # the weight format (registry name) or None when the layer keeps the generic matmul
    reason: str  # why: "compressed", "skipped by pattern '...'", "shape: M and K must be ..."
    # pruned to the recipe's sparsity before packing, whatever format stores it (a layer left to the
    # generic matmul is not packed, so not pruned)
    pruned: bool = False


def dense_format_for(target: TargetSpec, act_dtype: str) -> str:
    """The registry's dense weight format for this target and activation dtype (`dense_weight_format`)."""
    return dense_weight_format(target.kind, act_dtype)


def kernel_act_dtype(target: TargetSpec, graph_dtype: str) -> str:
    """Tensor Cores take fp16 activations; the CPU computes in the graph's own dtype."""
    return "float16" if target.kind == "cuda" else graph_dtype


def row_nonzeros_after_pruning(w: np.ndarray, recipe: WeightRecipe) -> np.ndarray:
    """Nonzeros per output row of W once pruned as the recipe says and rounded to fp16 (an upper bound
    for pruning methods that may zero more): every method keeps K - floor(sparsity * K) per row."""
    w = np.asarray(w)
    with np.errstate(over="ignore"):
        counts = (w.astype(np.float16) != 0).sum(axis=1)
    if recipe.sparsity is not None and recipe.prune != "none":
        counts = np.minimum(counts, w.shape[1] - int(np.floor(recipe.sparsity * w.shape[1])))
    return counts


def choose_sparse_format(
    site: LinearSite, row_nonzeros: np.ndarray, target: TargetSpec, dense: str, values: str = "fp16"
) -> str:
    """--sparse-format auto for one layer: among the sparse formats auto considers on this target (their
    `auto_targets`) whose nonzeros are `values` (fp16, or an eXmY: sparse x FPx), the one storing the
    fewest bytes for these nonzeros, or `dense` (the dense layout, or that FPx) when none stores fewer."""
    candidates: list[WeightFormat] = [
        f
        for f in WEIGHT_FORMATS.values()
        if f.sparse
        and f.sparse_values == values
        and target.kind in f.auto_targets
        and f.unsupported_reason(site.m, site.k) is None
    ]
    sized = [(f.sparse_bytes(site.m, site.k, row_nonzeros), f.name) for f in candidates]
    best = min(sized, default=None)
    if best is None or best[0] >= get_weight_format(dense).stored_bytes(site.m, site.k):
        return dense
    return best[1]


def _no_sparse_fpx_reason(values: str, target: TargetSpec) -> str:
    """Why auto keeps a pruned layer in plain FPx `values` on `target` (one phrase)."""
    if any(f.sparse and f.sparse_values == values and target.kind in f.auto_targets for f in WEIGHT_FORMATS.values()):
        return f"no sparse format of {values} values stores fewer bytes"
    return f"no sparse format of {values} values is chosen on {target.kind}; --sparse-format bitmap forces it"


def plan_weights(
    sites: list[LinearSite],
    recipe: WeightRecipe,
    target: TargetSpec,
    weights: Mapping[str, np.ndarray] | None = None,
) -> tuple[list[LayerPlan], dict[str, LayerChoice]]:
    """Decide each linear layer's format. Returns the plan (for people) and the choices (for the pass).
    `weights` (by name) are what --sparse-format auto sizes its candidates with."""
    plans, choices = [], {}
    skip_patterns = DEFAULT_SKIP + tuple(recipe.skip) if recipe.format else tuple(recipe.skip)
    auto = recipe.format == AUTO_SPARSE_FORMAT
    compressing = auto or (
        recipe.format is not None and get_weight_format(recipe.format, recipe.scale_search).compresses
    )
    for site in sites:
        act = kernel_act_dtype(target, site.act_dtype)
        dense = dense_format_for(target, act)
        fmt_name = recipe.format or dense
        skipped = next((p for p in skip_patterns if fnmatch.fnmatch(site.weight, p)), None)
        tied = compressing and skipped is None and site.also_read_by is not None
        why = f"skipped by pattern {skipped!r}" if skipped else ("compressed" if recipe.format else "dense")
        if skipped is not None or tied:
            fmt_name = dense
        elif auto:  # without the weight's values (none given): sized as if it had no zeros of its own
            w = weights[site.weight] if weights is not None and site.weight in weights else np.ones((site.m, site.k))
            fallback = recipe.values or dense  # sparse x FPx: the FPx format itself
            nonzeros = row_nonzeros_after_pruning(w, recipe)
            fmt_name = choose_sparse_format(site, nonzeros, target, fallback, recipe.values or "fp16")
            if fmt_name != fallback:
                why = "compressed"
            elif recipe.values:  # plain FPx, pruned
                why = f"compressed, not sparse (auto: {_no_sparse_fpx_reason(recipe.values, target)})"
            else:
                why = "dense (auto: no sparse format stores fewer bytes)"
        pruned = recipe.sparsity is not None and skipped is None and not tied
        fmt = get_weight_format(fmt_name, recipe.scale_search)
        reason = fmt.unsupported_reason(site.m, site.k)
        if target.kind not in fmt.targets:
            reason = f"no {target.kind} kernel"
        if tied:  # e.g. the LM head tied to the embeddings, by structure rather than by name
            why = f"skipped: {site.also_read_by} reads this weight too"
            why += " (an embedding tied to it)" if site.also_read_by == "take" else ""
        if reason is not None and fmt_name in (recipe.format, recipe.values):
            warnings.warn(
                f"{site.weight} [{site.m}x{site.k}] stays dense: the {fmt_name} kernel cannot take it ({reason}).",
                stacklevel=2,
            )
            why = f"dense (the {fmt_name} kernel cannot take it: {reason})"
            fmt_name = dense
            reason = get_weight_format(fmt_name).unsupported_reason(site.m, site.k)
        if reason is not None:
            plans.append(LayerPlan(site.weight, (site.m, site.k), None, f"generic matmul ({reason})"))
            continue
        plans.append(LayerPlan(site.weight, (site.m, site.k), fmt_name, why, pruned))
        choices[site.weight] = LayerChoice(fmt_name, act)
    return plans, choices
