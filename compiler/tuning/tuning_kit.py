"""A CUDA tuning kit: the Tensor Core kernels' candidate tile configs built here (nvcc, no GPU), timed
on a GPU by the kit's tuning part (benchmarks/kit/tuning_run.py), brought back as records (kit_import.py).

    kernels  = the template kernels to tune, each with its record key per token count
    configs  = tensorcore_candidates(...)                   default(s) first, then a seeded, ranked sample
    library  = one per kernel shape: every candidate, entry c<j> (compile_kernel_library)
    manifest = what the device needs to time them and write ready-made records

Layout of a kit folder (also the "tuning" part of the GPU kit, benchmarks/kit/prepare.py --tuning):

    <kit>/
    ├── manifest.json       {"tuning": SECTION, "dry", "arch", "commit", "versions", "summary", ...}
    ├── kernels/tune_<fmt>_<M>x<K>_<i>.so    one library per kernel: all its candidates
    └── runtime/            TVM's runtime without its compiler, and the formats' numpy packers

    SECTION = {"template": "tensorcore-weight-gemm", "schema": records.SCHEMA, "arch": "sm_90a", "budget_s": 90,
               "kernels": [{"name", "fmt", "m", "k", "buffers": [[name, [dims], dtype], ...], "library",
                            "candidates": [{"entry": "c0", "config": {TileConfig fields}}, ...],
                            "points": [{"tokens": N, "key": KEY, "candidates": [j, ...], "default": j}]}]}

A point is one record key (records.py: the kernel at one token count): its candidates are those whose
token tile suits N, its default the untuned choice. Kernels are built without bias (the key does not
hold it; the epilogue's add costs nothing measurable) and with fp16 output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorpress.compiler.targets import TargetSpec

SECTION = "tuning"
DEFAULT_DEVICE_BUDGET_S = 90.0  # device seconds the tuning part may spend on all its points
DEFAULT_KIT = ".tuning-kit"  # inside the repository: the device tool carries it (carry=[".tuning-kit"])
# Formats whose stored buffers depend on the weight's data, but whose weights the device part can make
# at the recorded buffer sizes (random pruned weights that fill the recorded capacity).
DEVICE_MADE_SPARSE = ("bitmap", "bitmap-e3m2")


@dataclass
class KitKernel:
    """One kernel shape to tune: its format, M, K, stored buffers, and a (token count, record key) per
    point; `func` is its unscheduled weight-GEMM PrimFunc (any n_hint: the candidates are drawn for all)."""

    name: str
    func: Any
    points: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


def kit_kernels(template_kernels: Sequence[Any]) -> list[KitKernel]:
    """Group template kernels (`template_search.TemplateKernel`) by what is built: one KitKernel per
    (format, buffers, M, K), a point per record key."""
    grouped: dict[str, KitKernel] = {}
    for kernel in template_kernels:
        key = kernel.key
        shape = json.dumps([key["format"], key["m"], key["k"]], sort_keys=True)
        entry = grouped.setdefault(shape, KitKernel(kernel.name, kernel.func))
        entry.points.append((kernel.tokens, key))
    return list(grouped.values())


def build_tuning_part(
    folder: Path, kernels: Sequence[KitKernel], arch: str, dry: bool, count: int, seed: int, budget_s: float
) -> dict[str, Any]:
    """Draw and build every kernel's candidates into folder/kernels/ (CUDA fatbins for `arch`, or the CPU
    replay when `dry`); returns the manifest SECTION (module docstring)."""
    import tvm

    from tensorpress.compiler.cuda.kernel_library import compile_kernel_library
    from tensorpress.compiler.tuning.tensorcore_candidates import tensorcore_candidates
    from tensorpress.schedules.template_config import TENSORCORE_WEIGHT_GEMM, kernel_signature
    from tensorpress.schedules.tensorcore.arch import arch_spec
    from tensorpress.schedules.tensorcore.intrinsics import cuda_intrinsics
    from tensorpress.schedules.tensorcore.template import schedule_weight_gemm
    from tensorpress.schedules.tensorcore.tile_config import TileConfig, choose_config, token_tile
    from tensorpress.schedules.verification.tensorcore_emulation import emulated_intrinsics

    (folder / "kernels").mkdir(parents=True, exist_ok=True)
    intrinsics = emulated_intrinsics() if dry else cuda_intrinsics()
    from tensorpress.compiler.tuning.records import SCHEMA

    section: dict[str, Any] = {
        "template": TENSORCORE_WEIGHT_GEMM,
        "schema": SCHEMA,
        "arch": arch,
        "budget_s": budget_s,
        "kernels": [],
    }
    for index, kernel in enumerate(kernels):
        signature = kernel_signature(kernel.func)
        m, k, fmt = signature["m"], signature["k"], signature["format"]["name"]
        tokens = [n for n, _ in kernel.points]
        configs = tensorcore_candidates(kernel.func, arch, tokens, count, seed)
        func = _bare_kernel(kernel.func)
        functions = {}
        for j, config in enumerate(configs):
            scheduled = schedule_weight_gemm(func, TileConfig(**config), intrinsics).mod["main"]
            functions[f"c{j}"] = scheduled.with_attr("global_symbol", f"c{j}")
        library = f"kernels/tune_{fmt.replace('-', '_')}_{m}x{k}_{index}.so"
        print(f"building {library}: {len(configs)} candidates", flush=True)
        seconds = compile_kernel_library(tvm.IRModule(functions), folder / library, None if dry else arch)
        points = []
        for n, key in kernel.points:
            default = choose_config(m, k, arch_spec(arch), n).to_dict()
            usable = [j for j, c in enumerate(configs) if c["block_n"] <= max(16, token_tile(n)) or c == default]
            points.append({"tokens": n, "key": key, "candidates": usable, "default": configs.index(default)})
        section["kernels"].append(
            {
                "name": kernel.name,
                "fmt": fmt,
                "m": m,
                "k": k,
                "buffers": signature["format"]["buffers"],
                "library": library,
                "candidates": [{"entry": f"c{j}", "config": c} for j, c in enumerate(configs)],
                "points": points,
                "build_seconds": round(seconds, 1),
            }
        )
    return section


def _bare_kernel(func: Any) -> Any:
    """The weight GEMM the kit times for `func`: the same format, stored buffers, M and K, without bias,
    fp16 in and out (what the device part calls: x, stored..., y)."""
    from tensorpress.compiler.formats import decode_stage
    from tensorpress.schedules.decode_stage import StoredBuffer
    from tensorpress.schedules.template_config import kernel_signature
    from tensorpress.schedules.weight_gemm import make_weight_gemm

    signature = kernel_signature(func)
    buffers = [StoredBuffer(name, tuple(shape), dtype) for name, shape, dtype in signature["format"]["buffers"]]
    stage = decode_stage(signature["format"]["name"])
    return make_weight_gemm(stage, signature["m"], signature["k"], buffers=buffers)


def point_kernels(formats_and_shapes: Sequence[tuple[str, int, int]], tokens: Sequence[int], arch: str):
    """KitKernels for weight GEMMs of these (format, M, K) at these token counts, keyed as a compile for
    `arch` keys a kernel of that shape whose n_hint is the token count (a decoder's decode step: 16)."""
    from tensorpress.compiler.formats import decode_stage
    from tensorpress.compiler.tuning.records import kernel_key
    from tensorpress.schedules.template_config import TENSORCORE_WEIGHT_GEMM, kernel_signature
    from tensorpress.schedules.weight_gemm import N_HINT_ATTR, make_weight_gemm

    target = TargetSpec("cuda", arch)
    kernels = []
    for fmt, m, k in formats_and_shapes:
        func = make_weight_gemm(decode_stage(fmt), m, k)
        kernel = KitKernel(f"{fmt} {m}x{k}", func)
        for n in tokens:
            signature = kernel_signature(func.with_attr(N_HINT_ATTR, n))
            kernel.points.append((n, kernel_key(signature, TENSORCORE_WEIGHT_GEMM, target)))
        kernels.append(kernel)
    return kernels


def write_tuning_kit(
    out: Path,
    kernels: Sequence[KitKernel],
    target: TargetSpec,
    count: int,
    budget_s: float = DEFAULT_DEVICE_BUDGET_S,
    seed: int = 0,
    dry: bool = False,
    python_version: str | None = None,
) -> dict[str, Any]:
    """A whole tuning kit at `out` (replaced): the tuning part, the runtime, a manifest; staged beside it
    and renamed into place, so a failed or killed prepare leaves no half kit. Returns the manifest."""
    import sys

    from tensorpress.compiler.build import compiler_versions
    from tensorpress.compiler.runtime_bundle import write_runtime_files, write_weight_formats

    arch = str(target.arch)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    python_version = python_version or (here if dry else "3.12")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tuning-kit.", dir=out.parent))
    try:
        start = time.perf_counter()
        section = build_tuning_part(staging, kernels, arch, dry, count, seed, budget_s)
        write_runtime_files(staging / "runtime", cuda=not dry, python_version=python_version)
        write_weight_formats(staging / "runtime" / "python" / "tensorpress")
        size = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
        candidates = sum(len(k["candidates"]) for k in section["kernels"])
        manifest = {
            "dry": dry,
            "arch": None if dry else arch,
            "python": python_version,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": source_commit(),
            "versions": compiler_versions(),
            "kernels": {},
            "kernel_library": {},
            SECTION: section,
            "build_seconds": round(time.perf_counter() - start, 1),
            "summary": {"kernels": candidates, "bytes": size, "arch": None if dry else arch, "dry": dry},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest


def source_commit() -> dict[str, Any]:
    """The repository's HEAD and whether tracked files differ from it (what a kit was built from)."""
    from tensorpress.compiler.tuning.records import REPO_ROOT

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        return result.stdout.strip()

    return {"sha": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
