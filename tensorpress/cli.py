"""`tensorpress` command line: compile, tune, calibrate, run, inspect, package, generate.

Start-up stays under a second: only argparse is imported here; each command imports what it needs.
A `TensorpressError` is printed as one line (`error: ...`) with exit status 1; warnings as `warning: ...`
(other libraries' deprecation notices are for their developers and stay hidden). Output cut short by its
reader (`tensorpress inspect m.tpk | head`) ends quietly with status 141, as `cat` does.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Sequence


def _compile(args: argparse.Namespace) -> int:
    import tensorpress
    from tensorpress.runtime.inspect_artifact import size_vs_fp16

    shapes = dict(_parse_shape(s) for s in args.input_shape or [])
    sparsity = _sparse_config(args)
    _show_stages()
    report = tensorpress.compile(
        args.model,
        args.output,
        target=args.target,
        dtype=args.dtype,
        weights=args.weights,
        sparsity=sparsity,
        skip=args.skip or (),
        scale_search=args.scale_search,
        calibration=args.calibration,
        kv_cache=_kv_cache_config(args),
        input_shapes=shapes or None,
        record_time=args.record_time,
        tuning_log=args.tuning_log,
    )
    manifest = report.manifest
    layers = manifest["layers"]
    stored = sum(layer["stored_bytes"] for layer in layers)
    fp16 = sum(layer["fp16_bytes"] for layer in layers)
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
    print(f"compiled {args.model} -> {report.artifact} for {args.target} ({timing})")
    if layers:
        formats = sorted({layer["format"] for layer in layers})
        print(
            f"  {len(layers)} linear layers ({', '.join(formats)}): {stored / 1e6:.2f} MB stored, "
            f"{fp16 / 1e6:.2f} MB as fp16 ({size_vs_fp16(stored, fp16)}){_pruning_summary(layers)}"
        )
    return 0


def _kv_cache_config(args: argparse.Namespace):
    """--kv-cache-dtype as compile takes it: the name, or a KVCacheConfig when --[no-]kv-int8-query is given."""
    if args.kv_int8_query is None:
        return args.kv_cache_dtype
    from tensorpress.compiler.compression_configs import KVCacheConfig

    if args.kv_cache_dtype not in ("int2-kitty", "int2-oscar"):
        from tensorpress.errors import ConfigError

        flag = "--kv-int8-query" if args.kv_int8_query else "--no-kv-int8-query"
        raise ConfigError(f"{flag} applies to --kv-cache-dtype int2-kitty or int2-oscar, not {args.kv_cache_dtype!r}.")
    return KVCacheConfig(args.kv_cache_dtype, int8_query=args.kv_int8_query)


def _pruning_summary(layers: list[dict]) -> str:
    """'; 6 pruned, 20.1% of their weights kept' for the layers with a recorded density, else ''."""
    pruned = [layer for layer in layers if "density" in layer]
    if not pruned:
        return ""
    weights = sum(layer["shape"][0] * layer["shape"][1] for layer in pruned)
    kept = sum(layer["density"] * layer["shape"][0] * layer["shape"][1] for layer in pruned)
    return f"; {len(pruned)} pruned, {kept / weights:.1%} of their weights kept"


def _sparse_config(args: argparse.Namespace):
    """The SparseConfig of --sparsity / --prune / --sparse-format, or None; a ConfigError for bad values."""
    from tensorpress.compiler.compression_configs import SparseConfig
    from tensorpress.compiler.pruning import check_sparsity
    from tensorpress.errors import ConfigError

    if args.sparsity is None:
        if args.prune is not None or args.sparse_format is not None:
            raise ConfigError("--prune and --sparse-format go with --sparsity S (the fraction of zeros, 0 <= S < 1).")
        return None
    try:
        value: object = float(args.sparsity)
    except ValueError:
        value = args.sparsity
    sparsity = check_sparsity(value, "--sparsity")
    return SparseConfig(sparsity, format=args.sparse_format or "auto", prune=args.prune or "magnitude")


def _show_stages() -> None:
    """The compile's stage lines (`importing ...`, `building ...`) on stderr as they start."""
    stages = logging.getLogger("tensorpress.compile")
    stages.setLevel(logging.INFO)
    if not any(isinstance(h, _StageLines) for h in stages.handlers):  # once per process
        stages.addHandler(_StageLines())


class _StageLines(logging.Handler):
    """`<message> ...` on sys.stderr as it is when the line is written (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{record.getMessage()} ...", file=sys.stderr, flush=True)


def _parse_shape(text: str) -> tuple[str, list[int | str]]:
    from tensorpress.errors import ConfigError

    name, _, dims = text.partition("=")
    if not name or not dims:
        raise ConfigError(f"--input-shape {text!r} must look like name=1,128 (a name, '=', comma-separated dims).")
    return name, [_dim(d.strip()) for d in dims.split(",")]


def _dim(text: str) -> int | str:
    """A size (an int, negative ones included, for the API's check to refuse) or a symbolic name."""
    try:
        return int(text)
    except ValueError:
        return text


def _tune(args: argparse.Namespace) -> int:
    from tensorpress.errors import ConfigError

    if args.import_kit is not None:
        if args.model is not None:
            raise ConfigError("--import-kit imports a GPU kit's timings and takes no model; give one or the other.")
        return _import_kit(args)
    if args.model is None:
        raise ConfigError("tune needs a model to tune (or --import-kit RESULTS to import a GPU kit's timings).")
    from tensorpress.compiler.tuning.tune_model import tune

    shapes = dict(_parse_shape(s) for s in args.input_shape or [])
    _show_stages()
    report = tune(
        args.model,
        target=args.target,
        dtype=args.dtype,
        weights=args.weights,
        sparsity=_sparse_config(args),
        skip=args.skip or (),
        input_shapes=shapes or None,
        trials=args.trials,
        time_budget=args.time_budget,
        log=args.log,
        generic_ops=args.generic_ops,
        rpc_tracker=args.rpc_tracker,
        rpc_key=args.rpc_key,
        kit=args.kit,
        kit_dry=args.dry_kit,
    )
    if report.kit is not None:
        print(_kit_instructions(report, args.log))
        return 0
    if not report.results and not report.generic:
        print(f"no kernel to tune in {args.model} for {args.target}")
        return 0
    print(report.summary)
    print(f"records: {report.log_dir}" + (f", plot: {report.plot}" if report.plot else ""))
    return 0


def _kit_instructions(report, log: str | None) -> str:
    """What a CUDA tune prepared, and the commands that time it on a GPU and bring the records back."""
    from tensorpress.compiler.tuning.records import shown_path

    manifest = report.kit_manifest
    section = manifest["tuning"]
    points = sum(len(k["points"]) for k in section["kernels"])
    kit = shown_path(report.kit)
    arch = section["arch"]
    lines = [
        f"prepared a tuning kit for {arch}{' (dry: CPU-built kernels)' if manifest['dry'] else ''}: {kit} "
        f"({len(section['kernels'])} kernels, {points} record keys, {manifest['summary']['kernels']} candidates, "
        f"{manifest['summary']['bytes'] / 2**20:.1f} MiB, built in {manifest['build_seconds']:.0f} s)",
        "no candidate is timed here: time them on a GPU machine that has this repository and the kit "
        f'(the device tool: carry ["{kit}"]), within {section["budget_s"]:.0f} device seconds:',
        f'    python3 benchmarks/kit/run.py --kit {kit} --only tune --out "$OUT"',
        "then append the timings to the log that compile reads:",
        f"    tensorpress tune --import-kit RESULTS_FOLDER --log {log or shown_path(report.log_dir)}",
    ]
    return "\n".join(lines)


def _import_kit(args: argparse.Namespace) -> int:
    from tensorpress.compiler.tuning.kit_import import import_kit_results, points_table
    from tensorpress.errors import ConfigError

    if args.log is None:
        raise ConfigError("--import-kit needs --log FOLDER, the tuning log to append to (e.g. tuning_logs/sm_90a).")
    report = import_kit_results(args.import_kit, args.log)
    if report.points:
        print(points_table(report.points))
    print(
        f"imported {report.appended} records ({report.best} finished kernels) from {len(report.files)} file(s) "
        f"into {report.log_dir}; {report.present} already there, {len(report.skipped)} skipped"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    from tensorpress.errors import InputError
    from tensorpress.runtime.atomic_file import atomic_output, check_destination
    from tensorpress.runtime.graph_model import GraphModel, read_npz_inputs
    from tensorpress.runtime.loaded_artifact import load_artifact

    check_destination(args.output, "outputs file", "out.npz")  # before the model loads and runs
    inputs = read_npz_inputs(args.inputs)
    loaded = load_artifact(args.artifact, args.device)
    if loaded.manifest["kind"] == "decoder":
        raise InputError(f"{args.artifact} is a decoder (an LLM); run it with `tensorpress generate`, not `run`.")
    model = GraphModel(loaded)
    outputs = model.run(inputs)
    names = [spec.name for spec in model.signature.outputs]
    with atomic_output(args.output) as f:
        np.savez(f, **dict(zip(names, outputs)))
    for name, value in zip(names, outputs):
        print(f"{name}: {value.dtype}{list(value.shape)}")
    print(f"wrote {args.output}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from tensorpress.compiler.calibration.kv_rotations import calibrate

    path = calibrate(args.model, args.data, args.output, dtype=args.dtype)
    print(f"calibrated the KV rotations of {args.model} on {args.data} -> {path}")
    print(f"  compile with: tensorpress compile {args.model} --kv-cache-dtype int2-oscar --calibration {path} -o ...")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from tensorpress.runtime.inspect_artifact import describe_artifact

    print(describe_artifact(args.artifact, as_json=args.json, verify=not args.no_verify))
    return 0


def _package(args: argparse.Namespace) -> int:
    from tensorpress.compiler.runtime_bundle import make_runtime_bundle

    bundle = make_runtime_bundle(args.artifact, args.output, python_version=args.python_version)
    print(f"runtime bundle for {args.artifact}: {bundle.folder} ({bundle.bytes / 1e6:.1f} MB)")
    print(f"  run it with: python3 {bundle.folder}/run.py --help")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from tensorpress.runtime.generate_cli import generate_command

    return generate_command(args)


def build_parser() -> argparse.ArgumentParser:
    import tensorpress

    parser = argparse.ArgumentParser(
        prog="tensorpress",
        description="Compile models with compressed weights for Tensor Cores, and run them.",
    )
    parser.add_argument("--version", action="version", version=f"tensorpress {tensorpress.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="compile a model (.onnx, .pt2, Hugging Face folder) into one artifact")
    p.add_argument("model", help="an .onnx file, a .pt2 file (torch.export.save) or a Hugging Face folder")
    p.add_argument("-o", "--output", required=True, help="artifact file to write (.tpk)")
    p.add_argument("--target", default="cpu", help=f"one of {', '.join(_target_choices())} (default cpu)")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        help="activation dtype (default: graph models keep their own dtype, and ONNX graphs can only; decoders "
        "run float16 on CUDA and float32 on the CPU; on CUDA, linear layers use fp16 Tensor Cores either way)",
    )
    p.add_argument("--weights", help=f"weight format: {_weight_format_choices()} (default dense)")
    p.add_argument("--skip", action="append", help="name pattern of linear weights to keep dense (repeatable)")
    p.add_argument(
        "--scale-search",
        choices=_scale_searches(),
        help="FPx scale search (default absmax; act: lowest layer-output error on --calibration)",
    )
    p.add_argument(
        "--sparsity",
        help="prune each linear weight to this fraction of zeros (0 <= S < 1) and store it sparse",
    )
    p.add_argument(
        "--prune",
        choices=_prune_methods(),
        help="with --sparsity: magnitude (per output row, the default), wanda (|w| x input norm per output "
        "row), sparsegpt (pruned and corrected from the layer's Hessian, then refitted by exact least squares "
        "per row: best quality, slow on large layers) or sparsegpt-sweep (the paper's sweep alone, no refit: "
        "for LLM-sized layers), all three with --calibration; or none (the weights as given)",
    )
    p.add_argument(
        "--calibration",
        help="sample inputs for --prune wanda/sparsegpt, --scale-search act and --kv-cache-dtype int2-oscar: an "
        ".npz of model inputs by name (one sample, or [samples, ...]) or a .txt of text, a sample a line (models "
        "with a tokenizer); int2-oscar also takes the calib.npz `tensorpress calibrate` writes",
    )
    p.add_argument(
        "--sparse-format",
        choices=_sparse_formats(),
        help="with --sparsity: the sparse weight format (default auto: per layer the fewest bytes on the target)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        help=f"decoders: how the KV cache is stored, one of {', '.join(_kv_cache_choices())} (default auto: the "
        "model's dtype; int8: int8 codes with a float32 scale per token and head)",
    )
    p.add_argument(
        "--kv-int8-query",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --kv-cache-dtype int2-kitty or int2-oscar on a CPU target: q·k over the 2-bit pages as integer "
        "dot products, q rounded to int8 (the scores move by q's rounding, far less than by the 2-bit keys); by "
        "default where it is faster (head_dim 64 or a multiple of 128); --no-kv-int8-query keeps q·k in fp32",
    )
    p.add_argument(
        "--input-shape", action="append", help="ONNX graphs: override an input shape, name=1,128 (repeatable)"
    )
    p.add_argument(
        "--record-time",
        action="store_true",
        help="write the compile's date and time into the artifact (by default none: the same model and "
        "options give the same bytes; SOURCE_DATE_EPOCH, where set, is the time recorded)",
    )
    p.add_argument(
        "--tuning-log",
        help="a folder `tensorpress tune` wrote: its records choose the kernels' tile configs, before the "
        "committed tuning_logs/<arch>/ (read always)",
    )
    p.add_argument("--verbose", action="store_true", help="print the full traceback of an error")
    p.set_defaults(func=_compile)

    p = sub.add_parser("tune", help="tune a model's kernels on this machine and append the records to a log")
    p.add_argument("model", nargs="?", help="the model, as for compile")
    p.add_argument(
        "--target",
        default="cpu",
        help="cpu (candidates timed here), or cuda:sm_XX (candidates built here into a tuning kit that the GPU "
        "kit times on a GPU; see --kit and --import-kit)",
    )
    p.add_argument("--dtype", choices=("float32", "float16"), help="activation dtype, as for compile")
    p.add_argument("--weights", help="weight format, as for compile")
    p.add_argument("--skip", action="append", help="name pattern of linear weights to keep dense (repeatable)")
    p.add_argument("--sparsity", help="as for compile (sparse kernels are not tuned yet)")
    p.add_argument("--prune", choices=_prune_methods(), help="as for compile")
    p.add_argument("--sparse-format", choices=_sparse_formats(), help="as for compile")
    p.add_argument("--input-shape", action="append", help="ONNX graphs: name=1,128 (repeatable), as for compile")
    p.add_argument(
        "--trials", type=int, help="measured candidates per kernel at most (default 32; cuda: 16 built per kernel)"
    )
    p.add_argument(
        "--time-budget", help="for the whole run, e.g. 90s, 10m, 1h (default: no limit; cuda: device seconds, 90s)"
    )
    p.add_argument("--log", help="log folder (default tuning_logs/<arch>/ of the repository, which compile reads)")
    p.add_argument(
        "--generic-ops",
        type=int,
        default=8,
        help="generic ops (no template: norms, softmax, attention matmuls) searched by meta_schedule, the costliest "
        "first, --trials each; 0 for none (default 8; ops with symbolic shapes are not tuned)",
    )
    p.add_argument("--rpc-tracker", help="HOST:PORT of a TVM RPC tracker: time candidates on its servers")
    p.add_argument("--rpc-key", help="the device key the servers registered under (with --rpc-tracker)")
    p.add_argument("--kit", help="cuda: the tuning kit folder to write (default .tuning-kit/ of the repository)")
    p.add_argument("--dry-kit", action="store_true", help="cuda: CPU-built kernels, to try the kit without a GPU")
    p.add_argument(
        "--import-kit",
        metavar="RESULTS",
        help="append a GPU kit's tuning timings (a tuning_*.json or its folder) to --log, instead of tuning",
    )
    p.add_argument("--verbose", action="store_true", help="print the full traceback of an error")
    p.set_defaults(func=_tune)

    p = sub.add_parser("calibrate", help="calibrate int2-oscar's KV rotations of a decoder on prompts")
    p.add_argument("model", help="a Hugging Face decoder folder")
    p.add_argument("--data", required=True, help="prompts: a .txt (a prompt a line) or an .npz of input_ids")
    p.add_argument("-o", "--output", required=True, help="the .npz to write (compile takes it as --calibration)")
    p.add_argument("--dtype", choices=("float32", "float16"), help="activation dtype of the run (default float32)")
    p.add_argument("--verbose", action="store_true", help="print the full traceback of an error")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("run", help="run a graph artifact on inputs from an .npz file")
    p.add_argument("artifact", help="a .tpk file compiled from a graph model (decoders: use generate)")
    p.add_argument("--inputs", required=True, help=".npz with one array per model input, by name")
    p.add_argument("--output", required=True, help=".npz to write the outputs to")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.set_defaults(func=_run)

    p = sub.add_parser("inspect", help="show an artifact's manifest, layers and sizes")
    p.add_argument("artifact", help="a .tpk file")
    p.add_argument("--json", action="store_true", help="print the raw manifest")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the parts")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("package", help="make a self-contained runtime bundle (no TVM needed where it runs)")
    p.add_argument("artifact", help="the .tpk file to bundle")
    p.add_argument("-o", "--output", required=True, help="folder to create")
    p.add_argument("--python-version", help="Python of the machine it runs on, e.g. 3.12 (default: this one)")
    p.set_defaults(func=_package)

    p = sub.add_parser("generate", help="generate tokens with a decoder artifact")
    from tensorpress.runtime.generate_cli import add_generate_arguments

    add_generate_arguments(p)
    p.set_defaults(func=_generate)
    return parser


def _prune_methods() -> tuple[str, ...] | None:
    try:
        from tensorpress.compiler.pruning import PRUNE_METHODS
    except ImportError:  # the runtime bundle ships no compiler (its compile command cannot run anyway)
        return None
    return PRUNE_METHODS


def _sparse_formats() -> list[str] | None:
    try:
        from tensorpress.compiler.formats import sparse_format_choices
    except ImportError:  # as above
        return None
    return sparse_format_choices()


def _weight_format_choices() -> str:
    """The registry's weight formats for --help: every name, the eXmY family as one entry."""
    import re

    try:
        from tensorpress.compiler.formats import weight_format_names
    except ImportError:  # the runtime bundle ships no compiler (its compile command cannot run anyway)
        return "those of the compiler"
    names = [n for n in weight_format_names() if not re.fullmatch(r"e\dm\d", n)]
    return ", ".join([*names, "eXmY"])


def _scale_searches() -> tuple[str, ...] | None:
    try:
        from tensorpress.compiler.formats import SCALE_SEARCHES
    except ImportError:  # as above
        return None
    return SCALE_SEARCHES


def _target_choices() -> tuple[str, ...]:
    try:
        from tensorpress.compiler.targets import TARGET_CHOICES
    except ImportError:  # the runtime bundle ships no compiler (its compile command cannot run anyway)
        return ("cpu", "cuda")
    return TARGET_CHOICES


def _kv_cache_choices() -> list[str]:
    """The KV-cache format names of the registry (checked by the API: an unknown one is one error line)."""
    try:
        from tensorpress.compiler.formats import kv_cache_format_names
    except ImportError:  # the runtime bundle ships no compiler (its compile command cannot run anyway)
        return ["auto"]
    return kv_cache_format_names()


def _raise_on_sigterm(signum, frame):  # pragma: no cover - exercised by a subprocess test
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # A terminated compile unwinds (and cleans up) like an interrupted one.
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    from tensorpress.errors import TensorpressError

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = show_warning
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader gone away shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        # The reader stopped reading (`| head`): end quietly, as cat does; stdout goes to /dev/null so
        # that the interpreter's own flush at exit finds nothing to complain about.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except TensorpressError as err:
        if getattr(args, "verbose", False) or os.environ.get("TENSORPRESS_DEBUG", "") not in ("", "0"):
            traceback.print_exception(err)  # the chained TVM error, for a bug report
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
