"""The demo model (examples/tiny_llama, compiled for the CPU) with quantised KV caches: int8 gives the
default cache's greedy tokens for 32 tokens and int4 the fp16 cache's first token, through the API and
the CLI; the runtime allocates what the manifest lists; the pool that --memory-fraction sizes grows as the
pages shrink; inspect states every KV format's bits and bytes; a bad --kv-cache-dtype is one error line
and writes nothing. (Greedy agreement over 64 tokens and perplexity: benchmarks/kv_cache_quality.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from decoder_harness import compile_decoder

from tensorpress.runtime import tvm_runtime
from tensorpress.runtime.decoder import DecoderModel
from tensorpress.runtime.inspect_artifact import describe_artifact
from tensorpress.runtime.loaded_artifact import load_artifact

DEMO = Path(__file__).resolve().parents[2] / "examples" / "tiny_llama"
PROMPTS = ["Return a new list containing", "def add(a, b):"]  # the demo's prompt first


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kv_quantised")
    paths = {}
    for kv in ("auto", "fp16", "int8", "int4"):
        paths[kv] = folder / f"{kv}.tpk"
        compile_decoder(DEMO, paths[kv], kv_cache=kv)
    return paths


def _model(path, **pool):
    return DecoderModel(load_artifact(path, "cpu"), **(pool or {"max_total_tokens": 256}))


def test_int8_kv_cache_gives_the_default_caches_greedy_tokens(artifacts):
    # (not every prompt: "Once upon a time" meets a near-tie at its 6th token, where int8 rounding flips it)
    # The demo model computes in fp32 on the CPU: "auto" keeps fp32 pages; fp16 pages are cast on write.
    default, fp16, int8 = (_model(artifacts[kv]) for kv in ("auto", "fp16", "int8"))
    assert [str(t.dtype) for t in fp16.kv_cache] == ["float16"]
    for prompt in PROMPTS:
        expected = default.generate(prompt, max_new_tokens=32, stop_ids=[])
        assert fp16.generate(prompt, max_new_tokens=32, stop_ids=[]) == expected
        assert int8.generate(prompt, max_new_tokens=32, stop_ids=[]) == expected
        assert len(expected) == 32


def test_int4_kv_cache_gives_the_fp16_caches_first_token(artifacts):
    fp16, int4 = _model(artifacts["fp16"]), _model(artifacts["int4"])
    prompts = [*PROMPTS, "Once upon a time", "Return the number of"]
    first = [fp16.generate(p, max_new_tokens=1, stop_ids=[]) for p in prompts]
    assert [int4.generate(p, max_new_tokens=1, stop_ids=[]) for p in prompts] == first
    # a ragged batch reads its int4 pages as each prompt does alone
    assert int4.generate(prompts, max_new_tokens=1, stop_ids=[]) == first


@pytest.mark.parametrize(
    "kv, tensors, dtypes, row_bytes",
    [("int8", ["kv_codes", "kv_scales"], ["int8", "float32"], lambda d: d + 4),
     ("int4", ["kv_codes", "kv_min_scale"], ["uint8", "float16"], lambda d: d // 2 + 4)],
)  # fmt: skip
def test_the_runtime_allocates_the_tensors_the_manifest_lists(artifacts, kv, tensors, dtypes, row_bytes):
    model = _model(artifacts[kv], max_total_tokens=64)
    section = model.section
    assert [t["name"] for t in section["cache_tensors"]] == tensors
    assert section["kv_cache"] == {"format": kv, "bits": int(kv[3:])}
    assert model.artifact.manifest["recipe"]["kv_cache"] == kv  # the option as the user wrote it
    config = section["config"]
    assert section["bytes_per_token"] == 2 * config["num_layers"] * config["num_kv_heads"] * row_bytes(
        config["head_dim"]
    )
    assert [str(t.dtype) for t in model.kv_cache] == dtypes
    assert list(model.kv_cache[0].shape)[1] == 64 // model.page_size


def test_the_pool_grows_as_the_pages_shrink(artifacts, monkeypatch):
    """The same --memory-fraction holds more tokens in smaller pages, and a --max-total-tokens that the fp16
    cache cannot fit in the same free memory fits in int4."""
    per_token = {kv: _model(artifacts[kv], max_total_tokens=16).section["bytes_per_token"] for kv in artifacts}
    assert per_token["auto"] == 2 * per_token["fp16"] and per_token["fp16"] > 3 * per_token["int4"]
    free = 1000 * per_token["fp16"]  # room for 1000 tokens of fp16 pages
    monkeypatch.setattr(tvm_runtime, "host_available_memory_bytes", lambda: free)
    tokens = {kv: _model(artifacts[kv], memory_fraction=0.5).cache.capacity_tokens for kv in artifacts}
    page = _model(artifacts["int4"], max_total_tokens=16).page_size
    for kv in artifacts:
        assert tokens[kv] == (free // 2) // (page * per_token[kv]) * page
    assert tokens["int4"] > 3 * tokens["fp16"] > 6 * tokens["auto"]
    from tensorpress.errors import InputError

    with pytest.raises(InputError, match="needs .* GiB but the device has"):
        _model(artifacts["fp16"], max_total_tokens=2000)
    assert _model(artifacts["int4"], max_total_tokens=2000).cache.capacity_tokens == 2000


def test_the_cli_generates_the_same_text_and_inspect_names_the_format(artifacts):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "tensorpress.cli", *args], capture_output=True, text=True)

    kinds = ("auto", "int8")
    runs = [cli("generate", str(artifacts[kv]), "--prompt", PROMPTS[0], "--max-new-tokens", "32") for kv in kinds]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    assert runs[0].stdout.splitlines()[:-1] == runs[1].stdout.splitlines()[:-1]  # the text (not the timing line)
    shown = cli("inspect", str(artifacts["int4"]))
    assert shown.returncode == 0, shown.stderr
    assert "KV cache: int4, 4 bits per element, 5.00 with scales, 320 bytes per token" in shown.stdout


def test_inspect_states_bits_per_element_and_bytes_per_token_of_every_kv_cache(artifacts):
    # the demo: 4 layers x K/V x 2 kv heads x 32 elements = 512 elements a token
    expected = {
        "auto": "auto, 32 bits per element, 2048 bytes per token",
        "fp16": "fp16, 16 bits per element, 1024 bytes per token",
        "int8": "int8, 8 bits per element, 9.00 with scales, 576 bytes per token",
        "int4": "int4, 4 bits per element, 5.00 with scales, 320 bytes per token",
    }
    for kv, words in expected.items():
        assert f"KV cache: {words}, pages of 16 tokens" in describe_artifact(artifacts[kv])


def test_inspect_words_hold_for_every_registered_kv_format():
    """Every format of the registry, through the decoder section the import writes (no compile)."""
    from tensorpress.compiler.formats import get_kv_cache_format, kv_cache_format_names
    from tensorpress.runtime.inspect_artifact import _kv_cache_line

    layers, kv_heads, head_dim, page = 4, 2, 32, 16
    for name in kv_cache_format_names():
        fmt = get_kv_cache_format(name)
        tensors = fmt.cache_tensors(layers, kv_heads, page, head_dim, "float32")
        per_token = fmt.bytes_per_token(layers, kv_heads, head_dim, "float32")
        section = {
            "config": {"num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim},
            "page_size": page,
            "cache_tensors": [t.to_dict() for t in tensors],
            "bytes_per_token": per_token,
            "kv_cache": {"format": name, "bits": fmt.code_bits("float32")},
        }
        quantisation = getattr(fmt, "page_quantisation", None)  # page-granular: sink and window in fp
        if quantisation is not None:
            section["page_quantisation"] = quantisation(layers, kv_heads, head_dim, page, "float32").to_dict()
        line = _kv_cache_line(section)
        assert f"KV cache: {name}, {fmt.code_bits('float32')} bits per element" in line, line
        assert f"{per_token} bytes per token" in line and all(t.name in line for t in tensors), line
        if quantisation is None:
            assert per_token == sum(t.bytes_per_page() for t in tensors) // page
        else:  # bytes per token of the quantised pages; the full-precision ones are stated beside
            quantised = sum(t.bytes_per_page() for t in tensors[1:])
            assert per_token == -(-quantised // fmt.page_tokens)  # type: ignore[attr-defined]
            assert f"full precision ({tensors[0].bytes_per_page() // page} bytes per token)" in line, line


def test_an_unknown_kv_cache_dtype_is_one_error_line_and_writes_nothing(tmp_path):
    out = tmp_path / "m.tpk"
    run = subprocess.run(
        [sys.executable, "-m", "tensorpress.cli", "compile", str(DEMO), "-o", str(out), "--kv-cache-dtype", "int3"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        "error: KVCacheConfig format must be one of auto, fp16, fp32, int8, int4, int2-kitty, int2-oscar, got 'int3'."
    ]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_kv_cache_format_on_a_graph_model_is_refused(tmp_path):
    import tensorpress
    from tensorpress.errors import ConfigError

    torch = pytest.importorskip("torch")
    with pytest.raises(ConfigError, match="applies to decoders only"):
        tensorpress.compile(
            torch.nn.Linear(4, 4), tmp_path / "m.tpk", example_inputs=(torch.ones(1, 4),), kv_cache="int4"
        )
    assert list(tmp_path.iterdir()) == []
