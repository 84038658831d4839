"""The demo model (examples/tiny_llama, compiled for the CPU) with an int8 KV cache: the same greedy tokens
as with the default cache for 32 tokens, through the API and the CLI; the runtime allocates what the
manifest lists; a bad --kv-cache-dtype is one error line and writes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from decoder_harness import compile_decoder

from tensorpress.runtime.decoder import DecoderModel
from tensorpress.runtime.loaded_artifact import load_artifact

DEMO = Path(__file__).resolve().parents[2] / "examples" / "tiny_llama"
PROMPTS = ["Return a new list containing", "def add(a, b):"]  # the demo's prompt first


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kv_int8")
    paths = {}
    for kv in ("auto", "fp16", "int8"):
        paths[kv] = folder / f"{kv}.tpk"
        compile_decoder(DEMO, paths[kv], kv_cache=kv)
    return paths


def test_int8_kv_cache_gives_the_default_caches_greedy_tokens(artifacts):
    # (not every prompt: "Once upon a time" meets a near-tie at its 6th token, where int8 rounding flips it)
    # The demo model computes in fp32 on the CPU: "auto" keeps fp32 pages; fp16 pages are cast on write.
    default = DecoderModel(load_artifact(artifacts["auto"], "cpu"), max_total_tokens=256)
    fp16 = DecoderModel(load_artifact(artifacts["fp16"], "cpu"), max_total_tokens=256)
    int8 = DecoderModel(load_artifact(artifacts["int8"], "cpu"), max_total_tokens=256)
    assert [str(t.dtype) for t in fp16.kv_cache] == ["float16"]
    for prompt in PROMPTS:
        expected = default.generate(prompt, max_new_tokens=32, stop_ids=[])
        assert fp16.generate(prompt, max_new_tokens=32, stop_ids=[]) == expected
        assert int8.generate(prompt, max_new_tokens=32, stop_ids=[]) == expected
        assert len(expected) == 32


def test_the_runtime_allocates_the_tensors_the_manifest_lists(artifacts):
    model = DecoderModel(load_artifact(artifacts["int8"], "cpu"), max_total_tokens=64)
    section = model.section
    assert [t["name"] for t in section["cache_tensors"]] == ["kv_codes", "kv_scales"]
    assert section["kv_cache"] == {"format": "int8", "bits": 8}
    assert model.artifact.manifest["recipe"]["kv_cache"] == "int8"  # the option as the user wrote it
    config = section["config"]
    per_token = 2 * config["num_layers"] * config["num_kv_heads"] * (config["head_dim"] + 4)
    assert section["bytes_per_token"] == per_token
    assert [str(t.dtype) for t in model.kv_cache] == ["int8", "float32"]
    assert list(model.kv_cache[0].shape)[1] == 64 // model.page_size


def test_the_cli_generates_the_same_text_and_inspect_names_the_format(artifacts):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "tensorpress.cli", *args], capture_output=True, text=True)

    runs = [cli("generate", str(artifacts[kv]), "--prompt", PROMPTS[0], "--max-new-tokens", "32") for kv in artifacts]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    assert runs[0].stdout.splitlines()[:-1] == runs[1].stdout.splitlines()[:-1]  # the text (not the timing line)
    shown = cli("inspect", str(artifacts["int8"])).stdout
    assert "KV cache: int8, 8 bits per element" in shown and "bytes per token" in shown


def test_an_unknown_kv_cache_dtype_is_one_error_line_and_writes_nothing(tmp_path):
    out = tmp_path / "m.tpk"
    run = subprocess.run(
        [sys.executable, "-m", "tensorpress.cli", "compile", str(DEMO), "-o", str(out), "--kv-cache-dtype", "int4"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        "error: KVCacheConfig format must be one of auto, fp16, fp32, int8, got 'int4'."
    ]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_kv_cache_format_on_a_graph_model_is_refused(tmp_path):
    import tensorpress
    from tensorpress.errors import ConfigError

    torch = pytest.importorskip("torch")
    with pytest.raises(ConfigError, match="applies to decoders only"):
        tensorpress.compile(
            torch.nn.Linear(4, 4), tmp_path / "m.tpk", example_inputs=(torch.ones(1, 4),), kv_cache="int8"
        )
    assert list(tmp_path.iterdir()) == []
