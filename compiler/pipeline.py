"""The story of a compile, top to bottom: import -> plan -> graph passes -> build -> write the artifact.

imported = import_model(model)                      frontend/: Relax + weights as named parameters
imported = convolutions_as_weight_gemms(imported)   CPU: NHWC, each groups=1 conv a linear over patches
imported = drop_unused_weights(imported)            weights nothing reads (e.g. an unused pooler)
sites    = find_linear_sites(imported.mod)           every linear layer with a weight parameter
plan     = plan_weights(sites, recipe, target, w)    which format each weight is stored in (with a sparsity:
                                                     pruned first, compiler/pruning.py; auto: by bytes)
packed   = compress_in_order(imported, feeds, ...)    with calibration: the compressed layers pruned / quantised
                                                     level by level from their inputs' X^T X
                                                     (compiler/calibration/): wanda, sparsegpt, act
imported = fuse_parallel_linears(imported, plan)     CPU: linears reading one input, stored alike, as one
                                                     (q/k/v, gate/up: their weights stacked by rows)
imported = RewriteLinearToWeightGemm(plan)(imported) linears -> weight-GEMM kernels, weights packed (CPU: a
                                                     following GELU or residual add in the kernel's store)
imported = fuse_encoder_attention(imported)          CPU: an encoder's softmax(q·kᵀ + mask)·v as one kernel
imported = mask_infinite_max_in_logsumexp(imported)  numerics: logsumexp of ±Inf rows as torch gives it
imported = decompose_gelu, FastMathTransform (CPU)   transcendentals as fast polynomials, not libm calls
library  = build_library(imported.mod, target, tuned) lower, schedules/ rules (tuned configs from the
                                                     tuning logs, compiler/tuning/), tvm.compile, nvcc for CUDA
write_artifact(out, library, imported.params, manifest)   (store_weights=False: shapes and dtypes only)

Every graph pass has one signature, ImportedModel -> ImportedModel (`compiler/passes/`), and this file
is the one place that orders them; the build after them only lowers and schedules.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tensorpress.compiler.build import build_library, compiler_versions
from tensorpress.compiler.build_folder import build_folder
from tensorpress.compiler.formats import PackedWeight, get_weight_format
from tensorpress.compiler.passes import GraphPass, on_module
from tensorpress.compiler.passes.convolutions_as_weight_gemms import convolutions_as_weight_gemms
from tensorpress.compiler.passes.decompose_gelu import decompose_gelu
from tensorpress.compiler.passes.drop_unused_weights import drop_unused_weights
from tensorpress.compiler.passes.fuse_encoder_attention import fuse_encoder_attention
from tensorpress.compiler.passes.fuse_parallel_linears import FUSED_LINEARS_INFO, FuseParallelLinears
from tensorpress.compiler.passes.mask_infinite_max_in_logsumexp import mask_infinite_max_in_logsumexp
from tensorpress.compiler.passes.rewrite_linear_to_weight_gemm import (
    LayerChoice,
    LinearSite,
    RewriteLinearToWeightGemm,
    find_linear_sites,
)
from tensorpress.compiler.pruning import prune
from tensorpress.compiler.targets import TargetSpec
from tensorpress.compiler.weight_plan import LayerPlan, WeightRecipe, plan_weights
from tensorpress.errors import TensorpressError
from tensorpress.frontend.relax_params import is_model_function, split_params
from tensorpress.imported_model import ImportedModel

log = logging.getLogger("tensorpress.compile")  # a line per stage (see tensorpress.compiler.api)


@dataclass
class CompileReport:
    """What a compile did, for people: where it wrote, how long each stage took, the layer plan."""

    artifact: Path
    manifest: dict[str, Any]
    seconds: dict[str, float]


@dataclass
class RewrittenModel:
    """A model after every graph pass, ready to build: its weight plan, packed weights and densities."""

    model: ImportedModel
    plans: list[LayerPlan]
    packed: dict[str, PackedWeight]
    densities: dict[str, float]
    fused_into: dict[str, str]  # member weight -> the stacked weight it is stored in (fuse_parallel_linears)


def compile_imported(
    imported: ImportedModel,
    output: Path,
    target: TargetSpec,
    recipe: WeightRecipe,
    recipe_as_written: dict[str, Any],
    timings: dict[str, float] | None = None,
    store_weights: bool = True,
    record_time: bool = False,
    calibration: list[dict[str, np.ndarray]] | None = None,
    tuning_logs: Sequence[Path] = (),
) -> CompileReport:
    """Everything after the import: plan, graph passes, build, write `output` atomically.

    store_weights=False writes no weight values (their names, shapes and dtypes only); weights of one
    shape are then packed once and shared, since only the packed shapes matter. record_time writes the
    compile's time into the manifest (see `write_artifact`; by default none, so artifacts reproduce).
    calibration: feeds ({input name: array}) to collect each compressed layer's input statistics on.
    tuning_logs: logs whose records tune the template kernels, earlier ones first (compiler/tuning/)."""
    seconds = dict(timings or {})
    start = time.perf_counter()
    rewritten = rewrite_for_target(imported, target, recipe, store_weights, calibration)
    seconds["rewrite"] = time.perf_counter() - start
    with build_folder() as tmp:
        log.info("building the kernels for %s", target.name)
        with internal_errors_named("build", target, rewritten.model.mod):
            configs = _config_lookup(tuning_logs, target)
            build = build_library(rewritten.model.mod, target, tmp / "library.so", configs, tuning_logs)
        seconds["build"] = build.seconds
        manifest = _manifest(
            rewritten.model,
            target,
            rewritten.plans,
            rewritten.packed,
            recipe_as_written,
            build.kernels,
            rewritten.densities,
            rewritten.fused_into,
        )
        manifest["kernel_configs"] = build.kernel_configs
        manifest["tuned_generic_kernels"] = build.tuned_kernels  # scheduled from meta_schedule records
        manifest["weights"]["stored"] = store_weights
        start = time.perf_counter()
        log.info("writing %s", output)
        from tensorpress.compiler.artifact_writer import write_artifact

        extra = rewritten.model.info.get("extra_files", {})
        manifest = write_artifact(
            output,
            build.library,
            rewritten.model.params,
            manifest,
            extra_files=extra,
            store_weights=store_weights,
            record_time=record_time,
        )
        seconds["write"] = time.perf_counter() - start
    return CompileReport(Path(output), manifest, seconds)


def _config_lookup(tuning_logs: Sequence[Path], target: TargetSpec):
    """The tuned template configs of `tuning_logs` (None: no log, every kernel its default)."""
    if not tuning_logs:
        return None
    from tensorpress.compiler.tuning.records import RecordLookup

    return RecordLookup(tuning_logs, target)


def rewrite_for_target(
    imported: ImportedModel,
    target: TargetSpec,
    recipe: WeightRecipe,
    store_weights: bool = True,
    calibration: list[dict[str, np.ndarray]] | None = None,
) -> RewrittenModel:
    """Plan and graph passes: the model as the build takes it (linears as weight-GEMM kernels)."""
    with internal_errors_named("rewrite", target):
        if target.kind == "cpu":
            imported = convolutions_as_weight_gemms(imported)
        imported = drop_unused_weights(imported)
        sites = find_linear_sites(imported.mod)
    plans, choices = plan_weights(sites, recipe, target, imported.params)
    pruned = {plan.weight for plan in plans if plan.pruned}
    densities: dict[str, float] = {}
    if sites:
        log.info("packing the weights of %d linear layers (%s)", len(sites), recipe.format or "dense")
    calibrated = _compress_calibrated(imported, sites, choices, recipe, calibration, target, pruned)
    fused_into: dict[str, str] = {}
    if target.kind == "cpu":  # where fusion was measured (issue 14); the Tensor Core records are per shape
        with internal_errors_named("rewrite", target):
            imported, fused_into = fuse_parallel_linears(imported, sites, choices, pruned, set(calibrated), recipe)
    packed: dict[str, PackedWeight] = {}
    packed_by_shape: dict[tuple, PackedWeight] = {}

    def pack(name: str, w: np.ndarray, choice: LayerChoice) -> PackedWeight:
        weight_format = get_weight_format(choice.format, recipe.scale_search)
        if name in calibrated:  # pruned / quantised from its inputs, level by level
            packed[name] = calibrated[name]
            if name in pruned or weight_format.sparse:
                stored = weight_format.unpack(packed[name])
                densities[name] = float(np.count_nonzero(stored)) / max(stored.size, 1)
            return packed[name]
        if name in pruned and recipe.sparsity is not None:
            w = prune(w, recipe.sparsity, recipe.prune)
        if name in pruned or weight_format.sparse:
            densities[name] = float(np.count_nonzero(w)) / max(w.size, 1)
        if store_weights:
            packed[name] = weight_format.pack(w)
        else:  # only shapes are written: one packing per (format, shape) serves every such weight
            key = (choice.format, w.shape)
            if key not in packed_by_shape:
                packed_by_shape[key] = weight_format.pack(w)
            packed[name] = packed_by_shape[key]
        return packed[name]

    with internal_errors_named("rewrite", target):
        # On CPUs a GELU or residual add reading a linear runs in the weight GEMM's store (one kernel)
        rewritten = RewriteLinearToWeightGemm(choices, pack, fuse_epilogues=target.kind == "cpu")(imported)
        if target.kind == "cpu":  # the kernel has a CPU schedule only (issue 14)
            rewritten = fuse_encoder_attention(rewritten)
        for graph_pass in numerics_passes(target):
            rewritten = graph_pass(rewritten)
    return RewrittenModel(rewritten, plans, packed, densities, fused_into)


def fuse_parallel_linears(
    imported: ImportedModel,
    sites: list[LinearSite],
    choices: dict[str, LayerChoice],
    pruned: set[str],
    calibrated: set[str],
    recipe: WeightRecipe,
) -> tuple[ImportedModel, dict[str, str]]:
    """`FuseParallelLinears` on the layers stored alike: one format (and activation dtype), pruned or
    not, none calibrated one by one (its packing is made for its own rows) or read by another op (a tied
    embedding). Updates `choices` and `pruned` in place (the stacked weight takes its members' entries);
    returns the model and {member: stacked weight}."""
    by_name = {site.weight: site for site in sites}

    def storage(weight: str) -> tuple[LayerChoice, bool] | None:
        site = by_name.get(weight)
        if weight not in choices or weight in calibrated or site is None or site.also_read_by is not None:
            return None
        return choices[weight], weight in pruned

    def accepts(key, m: int, k: int) -> bool:
        return get_weight_format(key[0].format, recipe.scale_search).unsupported_reason(m, k) is None

    imported = FuseParallelLinears(storage, accepts)(imported)
    fused_into: dict[str, str] = {}
    for stacked, members in imported.info.get(FUSED_LINEARS_INFO, {}).items():
        choices[stacked] = choices[members[0]]
        if members[0] in pruned:
            pruned.add(stacked)
        for member in members:
            fused_into[member] = stacked
            del choices[member]
    if fused_into:
        log.info("fused %d linear layers into %d weight GEMMs", len(fused_into), len(set(fused_into.values())))
    return imported, fused_into


def _compress_calibrated(imported, sites, choices, recipe, feeds, target, pruned) -> dict[str, PackedWeight]:
    """{weight: PackedWeight} of every compressed or `pruned` linear layer, pruned (wanda, sparsegpt) or
    quantised (act) from its input statistics, level by level (`compress_in_order`); {} without
    calibration."""
    if not feeds:
        return {}
    from tensorpress.compiler.calibration import compress_in_order

    by_name = {s.weight: s for s in sites}
    weights = {w: by_name[w].k for w, c in choices.items() if get_weight_format(c.format).compresses or w in pruned}

    def compress(name: str, stats) -> tuple[PackedWeight, np.ndarray]:
        site, param = by_name[name], imported.params[name]
        w = np.asarray(param, dtype=np.float32)
        w = w if site.transposed_in_graph else w.T  # [M, K], as the weight GEMM's packer takes it
        weight_format = get_weight_format(choices[name].format, recipe.scale_search)
        if name in pruned and recipe.sparsity is not None:
            w = prune(w, recipe.sparsity, recipe.prune, stats)
        packed = weight_format.pack_calibrated(w, stats.gram)
        w_stored = weight_format.unpack(packed)  # what the compiled layer computes with feeds the next level
        return packed, (w_stored if site.transposed_in_graph else w_stored.T).astype(param.dtype)

    log.info("calibrating %d linear layers on %d samples (CPU)", len(weights), len(feeds))
    start = time.perf_counter()
    with internal_errors_named("calibration", target):
        calibrated = compress_in_order(imported, feeds, weights, compress) if weights else {}
    log.info("calibrated compression took %.1fs", time.perf_counter() - start)
    return calibrated


def numerics_passes(target: TargetSpec) -> list[GraphPass]:
    """The passes after the weight rewrite that keep the numbers right and fast on `target`.

    On the CPU, transcendental functions go through TVM's fast polynomial forms (exp, erf, tanh,
    softmax) instead of scalar libm calls; CUDA has fast hardware versions already. The polynomials
    clamp their input with min/max, so NaN and ±Inf come out right once the build's PropagateNaN runs.
    """
    from tvm import relax

    passes = [mask_infinite_max_in_logsumexp]
    if target.kind == "cpu":
        passes += [decompose_gelu, on_module(relax.transform.FastMathTransform(), "fast_math")]
    return passes


@contextlib.contextmanager
def internal_errors_named(stage: str, target: TargetSpec, mod: Any = None) -> Iterator[None]:
    """Let no bare TVM/Python error out of a compile stage: anything but a TensorpressError becomes one
    sentence naming the stage, the failing kernel (found in `mod`) and the target (`build_failure.py`)."""
    try:
        yield
    except (TensorpressError, KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as err:
        from tensorpress.compiler.build_failure import internal_compile_error

        raise internal_compile_error(stage, target, err, mod) from err


def _manifest(
    model: ImportedModel,
    target: TargetSpec,
    plans: list[LayerPlan],
    packed: dict[str, PackedWeight],
    recipe: dict[str, Any],
    kernels: list[str],
    densities: dict[str, float],
    fused_into: dict[str, str],
) -> dict[str, Any]:
    from tvm import relax

    functions = {}
    for gvar, func in model.mod.functions_items():
        if isinstance(func, relax.Function) and is_model_function(func):
            inputs, weights = split_params(func)
            functions[gvar.name_hint] = {"num_input": len(inputs), "params": [v.name for v in weights]}
    layers = []
    for plan in plans:
        m, k = plan.shape
        # A fused layer is stored as rows of its stacked weight: its entry gives that weight's format, density
        # and its rows' share of the stored bytes, and names the stacked weight (`fused_into`).
        name = fused_into.get(plan.weight, plan.weight)
        stored = packed[name].nbytes if name in packed else int(model.params[name].nbytes)
        if name != plan.weight:
            stored = stored * m // packed[name].shape[0]
        layers.append(
            {
                "weight": plan.weight,
                "shape": [m, k],
                "format": plan.format or "generic",
                "stored_format": packed[name].format if name in packed else None,
                "reason": plan.reason,
                "stored_bytes": stored,
                "fp16_bytes": m * k * 2,
            }
            | ({"density": densities[name]} if name in densities else {})
            | ({"fused_into": name} if name != plan.weight else {})
        )
    weight_bytes = int(sum(np.asarray(v).nbytes for v in model.params.values()))
    return {
        "kind": model.kind,
        "versions": compiler_versions(),
        "built_on": {"python": platform.python_version(), "machine": platform.machine()},
        "source": model.source,
        "target": target.to_dict(),
        "cpu_flags": list(target.cpu_flags),
        "inputs": [s.to_dict() for s in model.inputs],
        "outputs": [s.to_dict() for s in model.outputs],
        "functions": functions,
        "recipe": recipe,
        "layers": layers,
        "weights": {"count": len(model.params), "bytes": weight_bytes},
        "kernels": kernels,
        "info": _jsonable(model.info),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
