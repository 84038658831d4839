"""`tensorpress.compile`: the Python face of `tensorpress compile`."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tensorpress.compiler.artifact_writer import build_time
from tensorpress.compiler.compression_configs import FPxConfig, KVCacheConfig, SparseConfig
from tensorpress.compiler.formats import get_weight_format
from tensorpress.compiler.input_shapes import check_input_shapes
from tensorpress.compiler.pipeline import CompileReport, compile_imported, internal_errors_named
from tensorpress.compiler.targets import TargetSpec, parse_target
from tensorpress.compiler.tvm_log import tvm_log_routed
from tensorpress.compiler.weight_plan import WeightRecipe
from tensorpress.errors import ConfigError
from tensorpress.runtime.atomic_file import check_destination

DTYPES = ("float32", "float16")
log = logging.getLogger("tensorpress.compile")  # one INFO line per stage; `tensorpress compile` shows them


def compile(  # noqa: A001 - the verb users expect: tensorpress.compile(model, ...)
    model: Any,
    output: str | os.PathLike,
    *,
    target: str = "cpu",
    dtype: str | None = None,
    weights: FPxConfig | str | None = None,
    sparsity: SparseConfig | None = None,
    kv_cache: KVCacheConfig | str | None = None,
    skip: Sequence[str] = (),
    scale_search: str | None = None,
    calibration: str | os.PathLike | None = None,
    example_inputs: tuple | None = None,
    input_shapes: dict[str, list[int | str]] | None = None,
    tracer: str = "export",
    store_weights: bool = True,
    record_time: bool = False,
    tuning_log: str | os.PathLike | bool | None = None,
    **import_options: Any,
) -> CompileReport:
    """Compile `model` into one artifact file at `output`.

    model: a path (.onnx, .pt2, Hugging Face folder), an onnx.ModelProto, a torch.nn.Module (with
        `example_inputs`), a torch.export.ExportedProgram or an fx GraphModule.
    target: "cpu", "cuda", "cuda:sm_80" or "cuda:sm_90a".
    dtype: "float32" or "float16" compute dtype. Decoders default to float16 on CUDA and float32 on the
        CPU; graph models keep their own dtype unless asked (torch and Hugging Face models are cast before
        export; ONNX graphs compile in the dtype they were exported in). On CUDA, linear layers always run
        on fp16 Tensor Cores.
    weights: None (dense), a weight format name ("fp6", "fp5", "fp4", "fp6-auto", "e2m3", ...), or an
        FPxConfig. `skip` adds fnmatch patterns of weights to keep dense; `scale_search` is "absmax"
        (default), "mse" or "act" (the clip with the lowest layer-output error, needs `calibration`).
    sparsity: a SparseConfig: each linear weight (those `skip` and the default filter leave) pruned
        ("magnitude" per output row, "wanda", "sparsegpt" and "sparsegpt-sweep" from `calibration`, or "none": as given;
        compiler/pruning.py) and stored in a sparse format ("auto": per layer the target's format storing
        the fewest bytes, ellpack on CPUs, bitmap on GPUs). With FPx `weights` (sparse x FPx) the nonzeros
        are FPx codes with the per-row scale (bitmap-eXmY; "auto" weighs it against plain FPx per layer,
        on GPUs). It does not combine with store_weights=False.
    calibration: graph models, a file of sample inputs the model is run on once (CPU) to collect each
        linear layer's input statistics: an .npz of inputs by name or a .txt of text (a sample a
        line, models with a tokenizer); layout in compiler/calibration/__init__.py.
    kv_cache: decoders only, how the KV cache is stored: a KV-cache format name ("auto", the model's
        dtype and the default; "fp16", "fp32", "int8", "int4", "int2-kitty", "int2-oscar") or a KVCacheConfig.
        int2-oscar needs `calibration`: prompts (.txt, .npz of input_ids) its rotations are calibrated on,
        or the calib.npz `tensorpress calibrate` wrote for this model.
    store_weights: False writes the weights' names, shapes and dtypes but not their values (the
        library alone, e.g. to carry a 7B-shaped model where 13 GB cannot go); they are given at load
        time, `tensorpress.runtime.load(path, weights={name: array})`. A Hugging Face decoder folder
        may then hold config.json alone.
    input_shapes: ONNX graphs only, {input name: dims}, each dim a size >= 1 or a symbolic name; a
        size the graph fixes cannot change.
    record_time: write the compile's date and time into the manifest. By default none is written and
        every zip member carries one fixed date, so the same model and options give the same bytes
        (SOURCE_DATE_EPOCH, where set, is the time recorded).
    tuning_log: a folder `tensorpress tune` wrote; its records tune the template kernels they match,
        before those of the committed tuning_logs/<arch>/ (read unless tuning_log is False: every kernel
        its default config). The manifest's kernel_configs says per kernel which config it got and from
        which log (or "default").
    Every option and the output path are checked before any work starts. Each stage logs a line (INFO,
    logger "tensorpress.compile"); TVM's own log lines go to the "tensorpress.tvm" logger (DEBUG).
    Returns a CompileReport (artifact path, manifest, seconds per stage).
    """
    target_spec = parse_target(target)
    check_destination(output, "artifact", example="model.tpk")
    build_time(record_time)  # a malformed SOURCE_DATE_EPOCH fails now, not after the build
    logs = tuning_logs_for(target_spec, tuning_log)
    with tvm_log_routed():
        prepared = import_for_compile(
            model,
            target_spec,
            dtype=dtype,
            weights=weights,
            sparsity=sparsity,
            kv_cache=kv_cache,
            skip=skip,
            scale_search=scale_search,
            calibration=calibration,
            example_inputs=example_inputs,
            input_shapes=input_shapes,
            tracer=tracer,
            store_weights=store_weights,
            **import_options,
        )
        return compile_imported(
            prepared.imported,
            Path(output),
            target_spec,
            prepared.recipe,
            prepared.as_written,
            prepared.timings,
            store_weights,
            record_time=record_time,
            calibration=prepared.feeds,
            tuning_logs=logs,
        )


def tuning_logs_for(target: TargetSpec, tuning_log: str | os.PathLike | bool | None) -> list[Path]:
    """The tuning logs a compile for `target` reads, first match wins: `tuning_log` (a folder, which
    must exist) and the committed tuning_logs/<arch>/ of the repository; none for tuning_log=False."""
    from tensorpress.compiler.tuning.records import default_log_dir

    if tuning_log is False:
        return []
    logs = []
    if tuning_log is not None and tuning_log is not True:
        if not Path(tuning_log).is_dir():
            raise ConfigError(
                f"tuning log folder {tuning_log} does not exist; give the --log folder a `tensorpress tune` wrote."
            )
        logs.append(Path(tuning_log))
    return [*logs, default_log_dir(target)]


@dataclasses.dataclass
class ImportedForCompile:
    """A model imported and checked as `compile` takes it, with its weight recipe (and as written)."""

    imported: Any
    recipe: WeightRecipe
    as_written: dict[str, Any]
    timings: dict[str, float]
    feeds: list | None


def import_for_compile(
    model: Any,
    target_spec: TargetSpec,
    *,
    dtype: str | None = None,
    weights: FPxConfig | str | None = None,
    sparsity: SparseConfig | None = None,
    kv_cache: KVCacheConfig | str | None = None,
    skip: Sequence[str] = (),
    scale_search: str | None = None,
    calibration: str | os.PathLike | None = None,
    example_inputs: tuple | None = None,
    input_shapes: dict[str, list[int | str]] | None = None,
    tracer: str = "export",
    store_weights: bool = True,
    **import_options: Any,
) -> ImportedForCompile:
    """Check every option of `compile` (see there) and import the model: what `compile` and `tune` share."""
    from tensorpress.frontend import import_model

    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
    kv_config = _kv_cache_config(kv_cache)
    rotated_kv = kv_config is not None and getattr(kv_config.kv_cache_format(), "attention_rotations", False)
    if rotated_kv:
        _check_rotated_kv(kv_config, model, calibration, store_weights)
    rotations_file = rotated_kv and _is_kv_rotations_file(calibration)
    calibration_data = None if rotations_file else _calibration_data(calibration, model, store_weights)
    recipe, as_written = _recipe(weights, skip, scale_search)
    if sparsity is not None:
        recipe = _sparse_recipe(recipe, sparsity, store_weights, calibrated=calibration_data is not None)
        as_written["sparsity"] = sparsity.to_dict()
    _check_calibration_used(recipe, calibration_data, calibrates_kv=rotated_kv)
    if input_shapes is not None:
        if _is_onnx_decoder(model) or _is_decoder_folder(model):
            raise ConfigError("decoders take no input shapes; their prompts and KV cache size themselves at run time.")
        check_input_shapes(input_shapes, model)
    if dtype is None and target_spec.kind == "cuda" and (_is_decoder_folder(model) or _is_onnx_decoder(model)):
        dtype = "float16"  # LLMs on GPUs run in fp16 (the Tensor Core GEMMs take fp16 activations)
    if not store_weights and _is_decoder_folder(model) and not list(Path(model).glob("*.safetensors")):
        import_options["shapes_only"] = True  # config.json alone: zero stand-ins, nothing to read
    if _is_decoder_folder(model) or _is_onnx_decoder(model):
        import_options["kv_cache"] = (kv_config or KVCacheConfig()).kv_cache_format()
        as_written["kv_cache"] = kv_cache.to_dict() if isinstance(kv_cache, KVCacheConfig) else kv_cache
        if rotated_kv:
            from tensorpress.compiler.calibration.kv_rotations import kv_rotations_for

            log.info("calibrating the KV cache's rotations on %s", Path(calibration).name)  # type: ignore[arg-type]
            with internal_errors_named("calibration", target_spec):
                import_options["kv_parameters"] = kv_rotations_for(model, calibration, dtype)  # type: ignore[arg-type]
            as_written["kv_calibration"] = Path(calibration).name  # type: ignore[arg-type]
    elif kv_config is not None:
        raise ConfigError(
            f"a KV cache format ({kv_config.format}) applies to decoders only; {_described(model)} is not a "
            "decoder (a Hugging Face causal-LM folder or an ONNX decoder exported with past_key_values)."
        )
    log.info("importing %s", _described(model))
    start = time.perf_counter()
    # under the target: kernels the import defines may fit it (the paged attention's chunks, see
    # `schedules/kv_attention.chunk_tokens`)
    with internal_errors_named("import", target_spec), target_spec.tvm_target():
        imported = import_model(
            model,
            example_inputs=example_inputs,
            input_shapes=input_shapes,
            dtype=dtype,
            tracer=tracer,
            **import_options,
        )
    timings = {"import": time.perf_counter() - start}
    as_written["dtype"] = imported.info.get("dtype") or _graph_dtype(imported)
    feeds = None
    if calibration_data is not None and _uses_calibration(recipe):
        from tensorpress.compiler.calibration import calibration_feeds

        feeds = calibration_feeds(calibration_data, imported)  # names, dtypes, shapes checked here
        as_written["calibration"] = {"file": calibration_data.path.name, "samples": len(feeds)}
    return ImportedForCompile(imported, recipe, as_written, timings, feeds)


def _described(model: Any) -> str:
    return str(model) if isinstance(model, (str, os.PathLike)) else f"a {type(model).__name__}"


def _is_onnx_decoder(model: Any) -> bool:
    if not isinstance(model, (str, os.PathLike)) or Path(model).suffix != ".onnx" or not Path(model).is_file():
        return False
    from tensorpress.frontend.onnx_decoder import is_onnx_decoder

    return is_onnx_decoder(model)


def _is_decoder_folder(model: Any) -> bool:
    if not isinstance(model, (str, os.PathLike)) or not Path(model, "config.json").is_file():
        return False
    from tensorpress.frontend.hf_folder import is_decoder_folder

    return is_decoder_folder(model)


def _graph_dtype(imported) -> str:
    floats = [spec.dtype for spec in imported.inputs + imported.outputs if spec.dtype.startswith("float")]
    return floats[0] if floats else "float32"


def _kv_cache_config(kv_cache: KVCacheConfig | str | None) -> KVCacheConfig | None:
    if kv_cache is None or isinstance(kv_cache, KVCacheConfig):
        return kv_cache
    if isinstance(kv_cache, str):
        return KVCacheConfig(kv_cache)  # an unknown name fails here, listing the valid ones
    raise ConfigError(f"kv_cache must be a KV cache format name or a KVCacheConfig, got {type(kv_cache).__name__}.")


def _calibration_data(calibration: Any, model: Any, store_weights: bool):
    """The calibration file read and checked before any work, or None."""
    if calibration is None:
        return None
    from tensorpress.compiler.calibration import read_calibration_file

    if not isinstance(calibration, (str, os.PathLike)):
        raise ConfigError(f"calibration must be the path of an .npz or .txt file, got {type(calibration).__name__}.")
    if _is_onnx_decoder(model):
        raise ConfigError(
            "calibration of ONNX decoders is not built (Hugging Face decoder folders and graph models are); "
            "compile the model's Hugging Face folder, or compile without it."
        )
    if not store_weights:
        raise ConfigError("calibration needs the weights' values; it cannot go with store_weights=False.")
    return read_calibration_file(calibration)


def _check_rotated_kv(kv_config: KVCacheConfig, model: Any, calibration: Any, store_weights: bool) -> None:
    """A KV format with calibrated rotations (int2-oscar) needs a decoder folder and calibration data."""
    if calibration is None:
        raise ConfigError(
            f"--kv-cache-dtype {kv_config.format} needs calibration data: give --calibration FILE (a .txt of "
            "prompts, an .npz of input_ids, or the calib.npz `tensorpress calibrate` writes)."
        )
    if not _is_decoder_folder(model):
        raise ConfigError(
            f"--kv-cache-dtype {kv_config.format} is calibrated on Hugging Face decoder folders only; "
            f"{_described(model)} is not one."
        )
    if not store_weights:
        raise ConfigError(f"--kv-cache-dtype {kv_config.format} needs the weights' values to calibrate on.")


def _is_kv_rotations_file(calibration: Any) -> bool:
    from tensorpress.compiler.calibration.kv_rotations import is_kv_rotations_file

    return isinstance(calibration, (str, os.PathLike)) and is_kv_rotations_file(calibration)


def _uses_calibration(recipe: WeightRecipe) -> bool:
    """Whether the weight recipe reads calibration data (a calibrated prune or the act scale search)."""
    from tensorpress.compiler.pruning import CALIBRATED_PRUNE_METHODS

    return recipe.scale_search == "act" or (recipe.sparsity is not None and recipe.prune in CALIBRATED_PRUNE_METHODS)


def _check_calibration_used(recipe: WeightRecipe, data: Any, calibrates_kv: bool = False) -> None:
    uses = _uses_calibration(recipe) or calibrates_kv
    if recipe.scale_search == "act" and data is None:
        raise ConfigError(
            "the act scale search needs calibration data; give --calibration FILE (an .npz of model inputs "
            "or a .txt of text), or use --scale-search mse."
        )
    if data is not None and not uses:
        raise ConfigError(
            "calibration data is read only by --prune wanda / sparsegpt, --scale-search act and --kv-cache-dtype "
            "int2-oscar; drop --calibration or ask for one of them."
        )


def _sparse_recipe(recipe: WeightRecipe, sparsity: Any, store_weights: bool, calibrated: bool) -> WeightRecipe:
    from tensorpress.compiler.formats import PLANNED_SPARSE_FORMATS
    from tensorpress.compiler.pruning import check_prune_method

    if not isinstance(sparsity, SparseConfig):
        raise ConfigError(f"sparsity must be a SparseConfig, got {type(sparsity).__name__}.")
    if sparsity.format in PLANNED_SPARSE_FORMATS:
        raise ConfigError(f"the {sparsity.format} sparse format is planned, not built yet; use auto or a built one.")
    fmt, values = sparsity.format, None
    if recipe.format is not None:  # sparse x FPx
        fmt, values = _sparse_fpx_format(recipe.format, sparsity.format)
    check_prune_method(sparsity.prune, calibrated)
    if not store_weights:
        raise ConfigError("sparse weights need their values at compile time (their stored sizes depend on them).")
    return dataclasses.replace(recipe, format=fmt, values=values, sparsity=sparsity.sparsity, prune=sparsity.prune)


def _sparse_fpx_format(weights: str, sparse_format: str) -> tuple[str, str]:
    """(the recipe's format: auto or the sparse format holding FPx codes, the eXmY of the nonzeros) for
    --weights `weights` with --sparse-format `sparse_format`; a ConfigError where none is built."""
    from tensorpress.compiler.formats import AUTO_SPARSE_FORMAT, sparse_format_with_values
    from tensorpress.compiler.formats.fpx import FPxFormat

    fpx = get_weight_format(weights)
    if not isinstance(fpx, FPxFormat):
        raise ConfigError(
            f"a sparsity combines with FPx weights only (fp6, fp5, fp4, e2m3, ...), not weights={weights!r}; "
            "give one FPx format or drop the sparsity."
        )
    if sparse_format == AUTO_SPARSE_FORMAT:
        return sparse_format, fpx.stage_name
    chosen = sparse_format_with_values(sparse_format, fpx.stage_name)
    if chosen is None:
        raise ConfigError(
            f"sparse x FPx is built for the bitmap format only, not {sparse_format}; use --sparse-format bitmap "
            f"or auto with weights={weights!r}."
        )
    return chosen, fpx.stage_name


def _is_fpx(name: str | None) -> bool:
    from tensorpress.compiler.formats.fpx import FPxAutoFormat, FPxFormat

    return name is not None and isinstance(get_weight_format(name), (FPxFormat, FPxAutoFormat))


def _recipe(weights, skip, scale_search) -> tuple[WeightRecipe, dict[str, Any]]:
    if isinstance(weights, FPxConfig):
        fmt = weights.format_name
        search = scale_search or weights.scale_search
        skip = tuple(weights.skip) + tuple(skip)
        written = {"weights": weights.to_dict()}
    elif isinstance(weights, str) or weights is None:
        fmt = weights
        search = scale_search or "absmax"
        written = {"weights": weights}
        if fmt is not None:
            get_weight_format(fmt, search)  # unknown names fail here, listing the valid ones
    else:
        raise ConfigError(f"weights must be a format name or an FPxConfig, got {type(weights).__name__}.")
    if search == "act" and not _is_fpx(fmt):
        raise ConfigError("the act scale search applies to FPx weights; give --weights fp6 (or another FPx format).")
    written.update({"skip": list(skip), "scale_search": search})
    return WeightRecipe(fmt, search, tuple(skip)), written
