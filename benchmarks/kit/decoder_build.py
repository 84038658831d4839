"""Build the decoder part of the GPU kit (this machine: TVM, nvcc, transformers; no GPU needed).

    kit/decoders/
    ├── hf/<name>/                 Hugging Face folders transformers loads there (small random models;
    │                              tiny_llama with its FP6-rounded weights; the 7B-shaped config alone)
    ├── artifacts/<name>.tpk       our artifacts: sm_90a (or llvm for the dry run)
    │                              llama7b_{fp16,fp6}.tpk hold no weight values (store_weights=False)
    └── kv_attention.so            the paged-attention kernels of tests/schedules/test_kv_attention_gpu.py

`prepare_decoders` returns the kit manifest's "decoders" section (what run.py and the scripts read).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.kit.decoder_cases import (
    DRY_THROUGHPUT,
    LLAMA_7B_SHAPED,
    SMALL_MODELS,
    SMALL_SEED,
    TINY_LLAMA,
    GreedyCase,
)

ROOT = Path(__file__).resolve().parents[2]
# (query heads, kv heads, head_dim) of the attention kernels the gpu tests run; dry: the small ones
ATTENTION_CONFIGS = [(32, 32, 128), (32, 8, 128), (16, 2, 64), (28, 4, 128)]
DRY_ATTENTION_CONFIGS = [(4, 2, 16), (6, 1, 16)]
ATTENTION_PAGE_SIZE = 16


def prepare_decoders(dest: Path, arch: str | None, dry: bool) -> dict:
    """Build everything under `dest` (the kit's decoders/ folder). arch None: CPU artifacts (dry run)."""
    dest.mkdir(parents=True)
    (dest / "hf").mkdir()
    (dest / "artifacts").mkdir()
    target = "cpu" if arch is None else f"cuda:{arch}"
    seconds: dict[str, float] = {}
    cases: list[GreedyCase] = []

    def compile_into(name: str, folder: Path, **options) -> str:
        import tensorpress

        start = time.perf_counter()
        artifact = dest / "artifacts" / f"{name}.tpk"
        tensorpress.compile(folder, artifact, target=target, dtype="float16", **options)
        seconds[name] = round(time.perf_counter() - start, 1)
        print(f"  decoder artifact {artifact.name}: {artifact.stat().st_size / 2**20:.1f} MiB", flush=True)
        return str(artifact.relative_to(dest.parent))

    for name in SMALL_MODELS:
        folder = make_small_model(name, dest / "hf" / name)
        cases.append(GreedyCase(name, str(folder.relative_to(dest.parent)), compile_into(name, folder), "fp16", True))
    tiny = ROOT / TINY_LLAMA
    cases.append(GreedyCase("tiny_llama", TINY_LLAMA, compile_into("tiny_llama_fp16", tiny), "fp16", False))
    fp6_artifact = compile_into("tiny_llama_fp6", tiny, weights="fp6")
    rounded = write_rounded_weights(tiny, dest.parent / fp6_artifact, dest / "hf" / "tiny_llama_fp6")
    cases.append(GreedyCase("tiny_llama_fp6", str(rounded.relative_to(dest.parent)), fp6_artifact, "fp6", True))

    config = DRY_THROUGHPUT if dry else LLAMA_7B_SHAPED
    shaped = dest / "hf" / "llama7b"
    shaped.mkdir()
    (shaped / "config.json").write_text(json.dumps(llama_config_dict(config), indent=1))
    throughput = {
        fmt: compile_into(f"llama7b_{fmt}", shaped, store_weights=False, weights=None if fmt == "fp16" else fmt)
        for fmt in config.formats
    }
    start = time.perf_counter()
    attention = build_attention_kernels(
        dest / "kv_attention.so", arch, DRY_ATTENTION_CONFIGS if dry else ATTENTION_CONFIGS
    )
    seconds["kv_attention.so"] = round(time.perf_counter() - start, 1)
    return {
        "greedy": [c.to_json() for c in cases],
        "throughput": {
            "config": config.to_json(),
            "hf_folder": str(shaped.relative_to(dest.parent)),
            "artifacts": throughput,
        },
        "attention_kernels": {"library": "decoders/kv_attention.so", "configs": attention, "page_size": 16},
        "build_seconds": seconds,
    }


def make_small_model(name: str, folder: Path) -> Path:
    """A random-init model of SMALL_MODELS[name], saved with safetensors. Matrices get a wider init than
    transformers' (so greedy argmax has no near-ties) and vectors an offset (so misused norms show),
    as the CPU tests do (tests/runtime/decoder_harness.py)."""
    import torch
    import transformers

    config_class, kwargs = SMALL_MODELS[name]
    torch.manual_seed(SMALL_SEED)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**kwargs))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return folder


def write_rounded_weights(source: Path, artifact: Path, folder: Path) -> Path:
    """A copy of the HF folder `source` whose FPx-stored linear weights are replaced by the values the
    artifact computes with (the format's exact round trip): transformers then runs the same weights."""
    from safetensors.numpy import load_file, save_file

    from tensorpress.compiler.formats import get_weight_format
    from tensorpress.runtime.artifact import open_artifact

    manifest = open_artifact(artifact).manifest
    search = manifest["recipe"].get("scale_search") or "absmax"
    folder.mkdir(parents=True)
    for item in source.iterdir():
        if item.suffix in (".json", ".txt", ".model") and item.is_file():
            shutil.copy(item, folder / item.name)
    tensors = {}
    for file in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(file))
    rounded = 0
    for layer in manifest["layers"]:
        if layer["format"] in (None, "generic") or layer["format"].startswith("dense"):
            continue
        w = tensors[layer["weight"]]
        tensors[layer["weight"]] = get_weight_format(layer["format"], search).roundtrip(w).astype(w.dtype)
        rounded += 1
    if not rounded:
        raise RuntimeError(f"{artifact} stores no FPx layer; nothing to round")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, folder / "model.safetensors")
    return folder


def llama_config_dict(config) -> dict:
    """config.json of the throughput model (what transformers and our frontend read)."""
    import transformers

    hf = transformers.LlamaConfig(**{k: v for k, v in config.hf_config().items() if k != "architectures"})
    hf.architectures = ["LlamaForCausalLM"]
    return hf.to_dict()


def build_attention_kernels(out: Path, arch: str | None, configs: list[tuple[int, int, int]]) -> list[dict]:
    """One library with append / prefill / decode kernels per config (fp16), named
    `kv_<phase>_<H>_<KVH>_<D>`; arch None: the CUDA schedule replayed for the CPU (dry run)."""
    import tvm

    from tensorpress.compiler.formats import get_kv_cache_format
    from tensorpress.schedules.kv_attention import kv_append_func, paged_attention_func
    from tensorpress.schedules.kv_attention_cuda import schedule_append, schedule_attention

    kv_cache = get_kv_cache_format("auto")

    functions, listed = {}, []
    for heads, kv_heads, head_dim in configs:
        tag = f"{heads}_{kv_heads}_{head_dim}"
        append = schedule_append(kv_append_func(kv_cache, kv_heads, head_dim, ATTENTION_PAGE_SIZE, "float16"))
        functions[f"kv_append_{tag}"] = append.mod["main"]
        for phase in ("prefill", "decode"):
            func = paged_attention_func(kv_cache, heads, kv_heads, head_dim, ATTENTION_PAGE_SIZE, "float16", phase)
            functions[f"kv_{phase}_{tag}"] = schedule_attention(func).mod["main"]
        listed.append({"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "tag": tag})
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in functions.items()})
    if arch is None:
        from tensorpress.schedules.verification.kv_attention_replay import build_replay

        build_replay(mod, seed=None).export_library(str(out))
        return listed
    from tensorpress.compiler.cuda.toolchain import ensure_cuda_build_support, library_has_gpu_binary
    from tensorpress.schedules.verification.cuda_inspection import cuda_target

    ensure_cuda_build_support()
    target = cuda_target(arch)
    with target:
        tvm.compile(mod, target=target).export_library(str(out))
    if not library_has_gpu_binary(out):
        raise RuntimeError(f"{out} holds no GPU binary: the nvcc toolchain is not in use")
    return listed
