"""The demo model (examples/tiny_llama, CPU) with the int2-oscar KV cache, calibrated on a few prompts
(.txt through the tokenizer), sink 16, window 32, quantised pages of 16 tokens, so prompts of ~100 tokens
already hold 2-bit pages:

- the rotations stored in the artifact are orthonormal, one R_K and one R_V per layer and kv head;
- with a window that never closes (nothing quantised) the rotated model gives the unrotated model's
  logits to float32 rounding, prefill and decode: q·k and the attention output are preserved;
- the first token (full-precision prefill) equals the fp16 cache's;
- after prefill, the pages past the sink and before the window are stored exactly as the numpy page
  reference quantises the full-precision (rotated) K/V of the same prompt, and decode reads them;
- inspect states the bits per element and bytes per token.
A random GQA Llama (4 query heads over 2 kv heads, calibrated on an .npz of input_ids) agrees on the
first token too. Three compiles and a calibration run take about a minute: the module is slow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from decoder_harness import compile_decoder, make_hf_decoder

from tensorpress.compiler.compression_configs import KVCacheConfig
from tensorpress.runtime.decoder import DecoderModel
from tensorpress.runtime.generation_options import check_generation_options
from tensorpress.runtime.loaded_artifact import load_artifact

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "examples" / "tiny_llama"
CONFIG = KVCacheConfig("int2-oscar", sink=16, window=32, page_tokens=16)
PROMPTS = [
    "def add(a, b):\n    return a + b",
    "Return a new list containing the squares of the numbers in the list.",
    "The quick brown fox jumps over the lazy dog, and the dog sleeps on.",
    "for i in range(10):\n    print(i * i)",
]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kv_oscar")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS))
    paths = {"oscar": folder / "oscar.tpk", "fp16": folder / "fp16.tpk", "auto": folder / "auto.tpk"}
    compile_decoder(DEMO, paths["oscar"], kv_cache=CONFIG, calibration=folder / "prompts.txt")
    compile_decoder(DEMO, paths["fp16"], kv_cache="fp16")
    compile_decoder(DEMO, paths["auto"])
    return paths


def _model(path, window=None):
    """A DecoderModel; `window` replaces the manifest's (a window that never closes: nothing is quantised)."""
    artifact = load_artifact(path, "cpu")
    if window is not None:
        artifact.manifest["info"]["decoder"]["page_quantisation"]["window_tokens"] = window
    return DecoderModel(artifact, max_total_tokens=1024)


def _long_prompt(seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(3, 1000, n)]


def test_the_stored_rotations_are_orthonormal_per_layer_and_kv_head(artifacts):
    loaded = load_artifact(artifacts["oscar"], "cpu")
    params = {name: p.numpy() for name, p in zip(loaded.param_names, loaded.params)}
    names = sorted(n for n in params if n.startswith("kv_rotations."))
    assert names == sorted(f"kv_rotations.{i}.{kind}" for i in range(4) for kind in ("key", "value"))
    for name in names:
        rotation = params[name].astype(np.float64)
        assert rotation.shape == (2, 32, 32)  # 2 kv heads, head_dim 32
        for r in rotation:
            np.testing.assert_allclose(r @ r.T, np.eye(32), atol=1e-6)
            assert np.abs(r - np.eye(32)).max() > 0.1  # not the identity: the calibration did something


def test_a_window_that_never_closes_gives_the_unrotated_models_logits(artifacts):
    oscar, plain = _model(artifacts["oscar"], window=10**6), _model(artifacts["auto"])
    prompts = [_long_prompt(3, 90), _long_prompt(4, 23)]
    np.testing.assert_allclose(oscar.next_token_logits(prompts), plain.next_token_logits(prompts), atol=2e-4)
    tokens = plain.generate(prompts, max_new_tokens=24, stop_ids=[])
    assert oscar.generate(prompts, max_new_tokens=24, stop_ids=[]) == tokens


def test_first_token_equals_the_fp16_caches(artifacts):
    oscar, fp16 = _model(artifacts["oscar"]), _model(artifacts["fp16"])
    prompts = [*PROMPTS[:2], _long_prompt(0, 120), _long_prompt(1, 77)]
    first = [fp16.generate(p, max_new_tokens=1, stop_ids=[]) for p in prompts]
    assert [oscar.generate(p, max_new_tokens=1, stop_ids=[]) for p in prompts] == first


def _prefilled(model, prompt):
    request = model._request(0, prompt, check_generation_options(8))
    model._start(request)
    model._run_prefill([request])
    return request


def _kv_rows(model, request, fmt):
    """[L, 2, KVH, T, D] what the cache holds for the request's tokens (quantised pages dequantised by the
    numpy reference) and the block-table entries."""
    pages, codes, min_scale = (t.numpy() for t in model.kv_cache)
    entries = model.cache.pages(request.seq_id)
    rows = []
    for entry in entries:
        if entry >= 0:
            rows.append(pages[:, entry])
        else:
            q = -1 - entry  # G = 1
            page = np.zeros_like(pages[:, 0])
            for layer in range(page.shape[0]):
                for g in range(page.shape[2]):
                    stored = (codes[layer, q, :, g], min_scale[layer, q, :, g])
                    page[layer, :, g] = np.stack(fmt.dequantize_page(stored, "float32"))
            rows.append(page)
    kv = np.concatenate(rows, axis=3)
    return kv[:, :, :, : model.cache.length(request.seq_id)], entries


def test_old_pages_are_stored_2bit_as_the_reference_says_and_decode_reads_them(artifacts):
    fmt = CONFIG.kv_cache_format()
    oscar, exact = _model(artifacts["oscar"]), _model(artifacts["oscar"], window=10**6)
    prompt = _long_prompt(2, 112)  # 7 pages: sink page 0, pages 1-4 before the window (80..111)
    r_oscar, r_exact = _prefilled(oscar, prompt), _prefilled(exact, prompt)
    stored, entries = _kv_rows(oscar, r_oscar, fmt)
    full, _ = _kv_rows(exact, r_exact, fmt)
    assert [e < 0 for e in entries] == [False, True, True, True, True, False, False]
    fp = np.r_[0:16, 80:112]
    np.testing.assert_array_equal(stored[:, :, :, fp], full[:, :, :, fp])
    for start in (16, 32, 48, 64):
        for layer in range(full.shape[0]):
            for g in range(full.shape[2]):
                page = fmt.quantize_page(*(full[layer, kv, g, start : start + 16] for kv in (0, 1)))
                expected = np.stack(fmt.dequantize_page(page, "float32"))
                np.testing.assert_array_equal(stored[layer, :, g, start : start + 16], expected)
    pool = exact.kv_cache[0].numpy()  # the reference reads the dequantised rows from full-precision pages
    for i, page in enumerate(exact.cache.pages(r_exact.seq_id)):
        pool[:, page] = stored[:, :, :, i * 16 : (i + 1) * 16].reshape(pool[:, page].shape)
    exact.kv_cache[0].copyfrom(pool)
    token = prompt[-1]
    logits = oscar._run_decode([r_oscar], [token])
    np.testing.assert_allclose(logits, exact._run_decode([r_exact], [token]), rtol=1e-5, atol=1e-5)
    plain = _model(artifacts["oscar"], window=10**6)
    assert np.abs(plain._run_decode([_prefilled(plain, prompt)], [token]) - logits).max() > 1e-3


def test_inspect_states_bits_and_bytes_per_token(artifacts):
    out = subprocess.run(
        [sys.executable, "-m", "tensorpress", "inspect", str(artifacts["oscar"])], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    # 4 layers x 2 kv heads x (K and V) x (32 / 4 code bytes + 4 bytes of min and scale) = 192 bytes a token
    assert "int2-oscar" in out.stdout and "192 bytes per token" in out.stdout, out.stdout


def test_a_random_gqa_llama_calibrated_on_input_ids_keeps_the_first_token(tmp_path):
    folder = make_hf_decoder("llama", tmp_path / "llama")
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "prompts.npz", input_ids=rng.integers(3, 384, (6, 40)).astype(np.int32))
    config = KVCacheConfig("int2-oscar", sink=16, window=16, page_tokens=16)
    oscar = compile_decoder(folder, tmp_path / "oscar.tpk", kv_cache=config, calibration=tmp_path / "prompts.npz")
    fp16 = compile_decoder(folder, tmp_path / "fp16.tpk", kv_cache="fp16")
    models = [_model(oscar), _model(fp16)]
    prompts = [_long_prompt(s, n) for s, n in ((6, 70), (7, 33), (8, 120))]
    prompts = [[t % 384 for t in p] for p in prompts]
    first = [[m.generate(p, max_new_tokens=1, stop_ids=[]) for p in prompts] for m in models]
    assert first[0] == first[1]


def test_tensorpress_calibrate_writes_what_compile_stores_and_compile_takes_it(artifacts, tmp_path):
    prompts = artifacts["oscar"].parent / "prompts.txt"
    calib = tmp_path / "calib.npz"
    out = subprocess.run(
        [sys.executable, "-m", "tensorpress", "calibrate", str(DEMO), "--data", str(prompts), "-o", str(calib)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    compiled = compile_decoder(DEMO, tmp_path / "from_file.tpk", kv_cache=CONFIG, calibration=calib)
    stored = [load_artifact(path, "cpu") for path in (artifacts["oscar"], compiled)]
    params = [{n: p.numpy() for n, p in zip(s.param_names, s.params)} for s in stored]
    with np.load(calib) as written:
        for name in (n for n in params[0] if n.startswith("kv_rotations.")):
            np.testing.assert_array_equal(written[name], params[0][name])  # the same prompts, the same run
            np.testing.assert_array_equal(params[1][name], params[0][name])
