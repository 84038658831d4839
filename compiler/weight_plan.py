"""Recipe -> per-weight plan: which linear layer is stored in which format, and which stay generic.

The plan is what `inspect` shows and the manifest records: for every linear layer, the format it is
stored in (or why it is not compressed), its shape and the bytes stored against the dense fp16 bytes.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass

from tensorpress.compiler.formats import dense_weight_format, get_weight_format
from tensorpress.compiler.passes.rewrite_linear_to_weight_gemm import LayerChoice, LinearSite
from tensorpress.compiler.targets import TargetSpec

# Names that mark a layer as the LM head or an embedding (kept dense by default, as FP6-LLM does); a
# weight that another op reads too (an LM head tied to the embeddings) is kept dense whatever its name.
DEFAULT_SKIP = ("*lm_head*", "*embed*", "*wte*", "*wpe*")


@dataclass(frozen=True)
class WeightRecipe:
    """What the user asked for: a weight format name (None = dense), its scale search and skip patterns;
    for a sparse format, the sparsity each weight is pruned to and how (`compiler/pruning.py`)."""

    format: str | None = None
    scale_search: str = "absmax"
    skip: tuple[str, ...] = ()
    sparsity: float | None = None  # None: a sparse format stores the weights as given
    prune: str = "magnitude"


@dataclass(frozen=True)
class LayerPlan:
    weight: str
    shape: tuple[int, int]  # [M, K]
    format: str | None  # the weight format (registry name) or None when the layer keeps the generic matmul
    reason: str  # why: "compressed", "skipped by pattern '...'", "shape: M and K must be ..."


def dense_format_for(target: TargetSpec, act_dtype: str) -> str:
    """The registry's dense weight format for this target and activation dtype (`dense_weight_format`)."""
    return dense_weight_format(target.kind, act_dtype)


def kernel_act_dtype(target: TargetSpec, graph_dtype: str) -> str:
    """Tensor Cores take fp16 activations; the CPU computes in the graph's own dtype."""
    return "float16" if target.kind == "cuda" else graph_dtype


def plan_weights(
    sites: list[LinearSite], recipe: WeightRecipe, target: TargetSpec
) -> tuple[list[LayerPlan], dict[str, LayerChoice]]:
    """Decide each linear layer's format. Returns the plan (for people) and the choices (for the pass)."""
    plans, choices = [], {}
    skip_patterns = DEFAULT_SKIP + tuple(recipe.skip) if recipe.format else tuple(recipe.skip)
    compressing = recipe.format is not None and get_weight_format(recipe.format, recipe.scale_search).compresses
    for site in sites:
        act = kernel_act_dtype(target, site.act_dtype)
        fmt_name = recipe.format or dense_format_for(target, act)
        skipped = next((p for p in skip_patterns if fnmatch.fnmatch(site.weight, p)), None)
        tied = compressing and skipped is None and site.also_read_by is not None
        if skipped is not None or tied:
            fmt_name = dense_format_for(target, act)
        fmt = get_weight_format(fmt_name, recipe.scale_search)
        reason = fmt.unsupported_reason(site.m, site.k)
        why = f"skipped by pattern {skipped!r}" if skipped else ("compressed" if recipe.format else "dense")
        if tied:  # e.g. the LM head tied to the embeddings, by structure rather than by name
            why = f"skipped: {site.also_read_by} reads this weight too"
            why += " (an embedding tied to it)" if site.also_read_by == "take" else ""
        if reason is not None and fmt_name == recipe.format:
            warnings.warn(
                f"{site.weight} [{site.m}x{site.k}] stays dense: the {fmt_name} kernel cannot take it ({reason}).",
                stacklevel=2,
            )
            why = f"dense (the {fmt_name} kernel cannot take it: {reason})"
            fmt_name = dense_format_for(target, act)
            reason = get_weight_format(fmt_name).unsupported_reason(site.m, site.k)
        if reason is not None:
            plans.append(LayerPlan(site.weight, (site.m, site.k), None, f"generic matmul ({reason})"))
            continue
        plans.append(LayerPlan(site.weight, (site.m, site.k), fmt_name, why))
        choices[site.weight] = LayerChoice(fmt_name, act)
    return plans, choices
