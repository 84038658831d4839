"""The demo model (examples/tiny_llama, CPU) with the int2-kitty KV cache, sink 16, window 32 and quantised
pages of 32 tokens (2 runtime pages), so that prompts of ~100 tokens already hold 2-bit pages:

- the first token (full-precision prefill) equals the fp16 cache's, alone and in a ragged batch;
- after prefill, the pages past the sink and before the window are stored exactly as the numpy page
  reference quantises the full-precision K/V of the same prompt, the others exactly as full precision;
- a decode step over them gives the logits of the same model reading those dequantised values from
  full-precision pages (the reference: the same artifact with a window that never closes);
- generate() over a ragged batch gives each prompt's tokens alone, reruns are bit-identical, and every
  page of both pools returns; out-of-pages is one error that leaves a running sequence alone;
- a two-turn conversation's second prefill reads the first turn's 2-bit pages as the reference model
  reads the same values; with full-precision pages a conversation equals one prompt of all its turns;
- the same --memory-fraction holds more tokens than fp16 pages; the CLI generates (one turn and a
  conversation) and inspect states the bits, bytes per token and the window."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from decoder_harness import compile_decoder

from tensorpress.compiler.compression_configs import KVCacheConfig
from tensorpress.errors import InputError
from tensorpress.runtime import tvm_runtime
from tensorpress.runtime.decoder import DecoderModel
from tensorpress.runtime.generation_options import check_generation_options
from tensorpress.runtime.loaded_artifact import load_artifact
from tensorpress.runtime.paged_kv_cache import OutOfKVPagesError

DEMO = Path(__file__).resolve().parents[2] / "examples" / "tiny_llama"
# the fp q·k (int8_query off): the 2-bit pages' reads checked against the reference to 1e-5 (the default
# int8-query scores have their own tests: test_kv_attention_int8_query.py, test_decoder_kv_int8_query.py)
CONFIG = KVCacheConfig("int2-kitty", boost_fraction=0.25, sink=16, window=32, page_tokens=32, int8_query=False)
PROMPTS = ["Return a new list containing", "def add(a, b):"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kv_kitty")
    paths = {"kitty": folder / "kitty.tpk", "fp16": folder / "fp16.tpk"}
    compile_decoder(DEMO, paths["kitty"], kv_cache=CONFIG)
    compile_decoder(DEMO, paths["fp16"], kv_cache="fp16")
    return paths


def _model(path, window=None, **pool):
    """A DecoderModel; `window` replaces the manifest's (a window that never closes: nothing is quantised)."""
    artifact = load_artifact(path, "cpu")
    if window is not None:
        artifact.manifest["info"]["decoder"]["page_quantisation"]["window_tokens"] = window
    return DecoderModel(artifact, **(pool or {"max_total_tokens": 1024}))


def _long_prompt(seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(3, 1000, n)]


def test_first_token_equals_the_fp16_caches_alone_and_in_a_ragged_batch(artifacts):
    kitty, fp16 = _model(artifacts["kitty"]), _model(artifacts["fp16"])
    prompts = [*PROMPTS, _long_prompt(0, 120), _long_prompt(1, 77)]
    first = [fp16.generate(p, max_new_tokens=1, stop_ids=[]) for p in prompts]
    assert [kitty.generate(p, max_new_tokens=1, stop_ids=[]) for p in prompts] == first
    assert kitty.generate(prompts, max_new_tokens=1, stop_ids=[]) == first


def _prefilled(model, prompt):
    """The request of `prompt` after its prefill (pages quantised as the runtime does after prefill)."""
    request = model._request(0, prompt, check_generation_options(8))
    model._start(request)
    model._run_prefill([request])
    return request


def _kv_rows(model, request, fmt):
    """[L, 2, KVH, T, D] the K/V the cache holds for the request's T tokens, quantised pages dequantised
    with the numpy reference, and the block-table entries."""
    pages, *stored = (t.numpy() for t in model.kv_cache)
    entries = model.cache.pages(request.seq_id)
    group, page = fmt.group_pages(model.page_size), model.page_size
    rows = []
    for entry in entries:
        if entry >= 0:
            rows.append(pages[:, entry])
            continue
        q, sub = divmod(-1 - entry, group)
        layers = []
        for layer in range(pages.shape[0]):
            heads = []
            for g in range(pages.shape[2]):
                parts = [stored[0][layer, q, :, g], *(a[layer, q, g] for a in stored[1:])]
                k, v = fmt.dequantize_page(parts, str(pages.dtype))
                heads.append(np.stack([k, v])[:, sub * page : (sub + 1) * page])
            layers.append(np.stack(heads, axis=1))
        rows.append(np.stack(layers))
    kv = np.concatenate(rows, axis=3)  # [L, 2, KVH, pages·PS, D]
    return kv[:, :, :, : model.cache.length(request.seq_id)], entries


def test_old_pages_are_stored_2bit_as_the_reference_says_and_decode_reads_them(artifacts):
    fmt = CONFIG.kv_cache_format()
    kitty, exact = _model(artifacts["kitty"]), _model(artifacts["kitty"], window=10**6)
    prompt = _long_prompt(2, 112)  # 7 pages: sink page 0, groups (1, 2) and (3, 4) before the window (80..111)
    r_kitty, r_exact = _prefilled(kitty, prompt), _prefilled(exact, prompt)
    stored, entries = _kv_rows(kitty, r_kitty, fmt)
    full, _ = _kv_rows(exact, r_exact, fmt)
    assert [e < 0 for e in entries] == [False, True, True, True, True, False, False]
    assert kitty.cache.held(r_kitty.seq_id) == (3, 2) and exact.cache.held(r_exact.seq_id) == (7, 0)
    fp = np.r_[0:16, 80:112]  # sink page, window pages: stored as they are
    np.testing.assert_array_equal(stored[:, :, :, fp], full[:, :, :, fp])
    for start in (16, 48):  # each quantised page: the reference's quantise + dequantise of the exact rows
        for layer in range(full.shape[0]):
            for g in range(full.shape[2]):
                page = fmt.quantize_page(*(full[layer, kv, g, start : start + 32] for kv in (0, 1)))
                expected = np.stack(fmt.dequantize_page(page, "float32"))
                np.testing.assert_array_equal(stored[layer, :, g, start : start + 32], expected)
    assert not np.array_equal(stored, full)
    # the reference model reads the dequantised rows from its full-precision pages
    pool = exact.kv_cache[0].numpy()
    for i, page in enumerate(exact.cache.pages(r_exact.seq_id)):
        pool[:, page] = stored[:, :, :, i * 16 : (i + 1) * 16].reshape(pool[:, page].shape)
    exact.kv_cache[0].copyfrom(pool)
    token = prompt[-1]
    logits, expected = kitty._run_decode([r_kitty], [token]), exact._run_decode([r_exact], [token])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    plain = _model(artifacts["kitty"], window=10**6)
    r_plain = _prefilled(plain, prompt)
    assert np.abs(plain._run_decode([r_plain], [token]) - logits).max() > 1e-3  # the 2-bit pages were read


def test_a_prompt_prefilled_in_slices_reads_the_2bit_pages_of_the_earlier_slices(artifacts):
    """A second turn, in effect: slices of 64 tokens; after the second (length 128) tokens 16..79 are 2-bit,
    and the third slice (128..139) must read them as the reference model reads the same values from
    full-precision pages."""
    fmt = CONFIG.kv_cache_format()
    kitty = _model(artifacts["kitty"], max_prefill_tokens=64)
    prompt = _long_prompt(7, 140)
    request = kitty._request(0, prompt, check_generation_options(8))
    kitty._start(request)
    logits = kitty._run_prefill([request])
    stored, entries = _kv_rows(kitty, request, fmt)
    assert [e < 0 for e in entries] == [False, True, True, True, True, False, False, False, False]
    exact = _model(artifacts["kitty"], window=10**6)
    reference = _prefilled(exact, prompt[:128])  # the first two slices, then the dequantised rows in fp pages
    pool = exact.kv_cache[0].numpy()
    for i, page in enumerate(exact.cache.pages(reference.seq_id)):
        pool[:, page] = stored[:, :, :, i * 16 : (i + 1) * 16].reshape(pool[:, page].shape)
    exact.kv_cache[0].copyfrom(pool)
    reference.prompt = prompt
    exact.cache.extend(reference.seq_id, 140)
    expected = exact._prefill_call([(reference, 128, 140)])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    whole = _model(artifacts["kitty"])  # one slice: the whole prompt in full precision
    assert np.abs(whole.next_token_logits([prompt]) - logits).max() > 1e-3


def _capturing_logits(model):
    """Record the logits row of every token `model` emits (the conversation API returns only tokens)."""
    rows, emit = [], model._emit

    def recording(r, logits, *rest):
        rows.append(np.array(logits))
        return emit(r, logits, *rest)

    model._emit = recording
    return rows


def test_a_two_turn_conversation_reads_its_first_turns_2bit_pages(artifacts):
    """Turn 1 (110 + 12 tokens) leaves tokens 16..79 in 2-bit pages; turn 2's prefill (its last answer token +
    20 prompt tokens) must read them as the reference model reads the same values from full-precision pages."""
    fmt = CONFIG.kv_cache_format()
    kitty = _model(artifacts["kitty"])
    first, second = _long_prompt(8, 110), _long_prompt(9, 20)
    chat = kitty.conversation()
    answer = chat.send(first, max_new_tokens=12, stop_ids=[])
    cached = chat.cached_tokens
    assert cached == kitty.cache.length(chat._seq_id) == 121  # the last answer token waits for turn 2
    assert kitty.cache.held(chat._seq_id)[1] == 2  # two 2-bit pages of 32 tokens
    stored, _ = _kv_rows(kitty, SimpleNamespace(seq_id=chat._seq_id), fmt)
    stored = np.pad(stored, [(0, 0)] * 3 + [(0, -cached % 16), (0, 0)])  # whole pages (the last one partly used)
    logits = _capturing_logits(kitty)
    reply = chat.send(second, max_new_tokens=4, stop_ids=[])
    assert chat.tokens == [*first, *answer, *second, *reply]

    exact = _model(artifacts["kitty"], window=10**6)  # the cached rows, dequantised, in full-precision pages
    history = chat.tokens[:cached]
    reference = _prefilled(exact, history)
    pool = exact.kv_cache[0].numpy()
    for i, page in enumerate(exact.cache.pages(reference.seq_id)):
        pool[:, page] = stored[:, :, :, i * 16 : (i + 1) * 16].reshape(pool[:, page].shape)
    exact.kv_cache[0].copyfrom(pool)
    reference.prompt = [*history, answer[-1], *second]
    exact.cache.extend(reference.seq_id, len(reference.prompt))
    expected = exact._prefill_call([(reference, cached, len(reference.prompt))])
    np.testing.assert_allclose(logits[0], expected[0], rtol=1e-5, atol=1e-5)
    assert reply[0] == int(np.argmax(expected[0]))
    whole = _model(artifacts["kitty"])  # the same tokens in one prompt: no 2-bit page is read
    assert np.abs(whole.next_token_logits([reference.prompt]) - logits[0]).max() > 1e-3

    chat.close()
    assert kitty.cache.num_free_pages == kitty.cache.num_pages
    assert kitty.cache.num_free_quantised_pages == kitty.cache.num_quantised_pages
    with pytest.raises(InputError, match="conversation is closed"):
        chat.send(second)


def test_a_conversation_with_full_precision_pages_equals_one_prompt_of_its_turns(artifacts):
    fp16 = _model(artifacts["fp16"], max_total_tokens=128)
    turns = [_long_prompt(10, 30), _long_prompt(11, 9), _long_prompt(12, 17)]
    with fp16.conversation() as chat:
        never_read = chat.send_stream(turns[0], max_new_tokens=6)  # prepared, never started: holds nothing
        answers = [chat.send(t, max_new_tokens=6, stop_ids=[]) for t in turns[:2]]
        with pytest.raises(InputError, match="another turn of this conversation ran after this one was prepared"):
            next(never_read)
        with pytest.raises(OutOfKVPagesError):  # refused before it started: the conversation stays as it was
            chat.send(turns[2], max_new_tokens=200)
        answers.append(chat.send(turns[2], max_new_tokens=6, stop_ids=[]))
        held = fp16.cache.num_pages - fp16.cache.num_free_pages
        assert held == -(-chat.cached_tokens // fp16.page_size)  # the pages stay between turns
        other = fp16.generate(PROMPTS[0], max_new_tokens=4)  # another request beside the open conversation
    assert other == fp16.generate(PROMPTS[0], max_new_tokens=4)
    assert fp16.cache.num_free_pages == fp16.cache.num_pages
    so_far: list[int] = []
    for turn, answer in zip(turns, answers):
        so_far += turn
        assert fp16.generate(so_far, max_new_tokens=6, stop_ids=[]) == answer
        so_far += answer


def test_a_ragged_batch_gives_each_prompts_tokens_and_every_page_returns(artifacts):
    kitty = _model(artifacts["kitty"])
    prompts = [_long_prompt(3, 90), PROMPTS[0], _long_prompt(4, 40)]  # decoding crosses group boundaries
    alone = [kitty.generate(p, max_new_tokens=48, stop_ids=[]) for p in prompts]
    assert kitty.generate(prompts, max_new_tokens=48, stop_ids=[]) == alone
    assert kitty.generate(prompts, max_new_tokens=48, stop_ids=[]) == alone  # bit-identical rerun
    assert kitty.cache.num_free_pages == kitty.cache.num_pages
    assert kitty.cache.num_free_quantised_pages == kitty.cache.num_quantised_pages > 0


def test_out_of_pages_is_one_error_and_leaves_a_running_sequence_alone(artifacts):
    kitty = _model(artifacts["kitty"], max_total_tokens=256)
    prompt = _long_prompt(5, 90)
    expected = kitty.generate(prompt, max_new_tokens=40, stop_ids=[])
    stream = kitty.generate_stream(prompt, max_new_tokens=40, stop_ids=[])
    got = [next(stream).token]
    with pytest.raises(OutOfKVPagesError, match="raise max_total_tokens to at least 500"):
        kitty.generate(_long_prompt(6, 400), max_new_tokens=100, stop_ids=[])
    got += [event.token for event in stream]
    assert got == expected
    assert kitty.cache.num_free_pages == kitty.cache.num_pages


def test_the_same_memory_holds_more_tokens_than_fp16_pages(artifacts, monkeypatch):
    """The pools take the most tokens that fit: the full-precision pool (the model's fp32 here) stops at 8
    sequences' sink + window + group + 1 pages, the rest is 2-bit pages. Small budgets are mostly the fp
    pool; from a few MB on the 2-bit pages dominate."""

    fp16_per_token = _model(artifacts["fp16"], max_total_tokens=16).section["bytes_per_token"]
    free = 20000 * fp16_per_token  # room for 20000 tokens of fp16 pages
    monkeypatch.setattr(tvm_runtime, "host_available_memory_bytes", lambda: free)
    fp16 = _model(artifacts["fp16"], memory_fraction=0.5)
    kitty = _model(artifacts["kitty"], memory_fraction=0.5)
    full_page, quantised_page = (
        sum(t.numpy()[:, :1].nbytes for t in ts) for ts in (kitty.kv_cache[:1], kitty.kv_cache[1:])
    )
    assert kitty.cache.num_pages == 8 * (1 + 2 + 2 + 1)  # sink, window, group, the new page
    used = kitty.cache.num_pages * full_page + kitty.cache.num_quantised_pages * quantised_page
    assert used <= free // 2 < used + quantised_page  # one more 2-bit page would not fit
    assert kitty.cache.capacity_tokens > 3 * fp16.cache.capacity_tokens
    # a --max-total-tokens that fp16 pages cannot hold in 4000 tokens' memory fits with int2-kitty
    monkeypatch.setattr(tvm_runtime, "host_available_memory_bytes", lambda: 4000 * fp16_per_token)
    with pytest.raises(InputError, match="needs .* GiB but the device has"):
        _model(artifacts["fp16"], max_total_tokens=8000)
    assert _model(artifacts["kitty"], max_total_tokens=8000).cache.num_quantised_pages * 32 == 8000


def test_the_cli_generates_and_inspect_states_bits_bytes_and_the_window(artifacts):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "tensorpress.cli", *args], capture_output=True, text=True)

    run = cli("generate", str(artifacts["kitty"]), "--prompt", PROMPTS[0], "--max-new-tokens", "8")
    assert run.returncode == 0, run.stderr
    ids = [int(t) for t in run.stdout.splitlines()[0].split(",")]
    assert ids == _model(artifacts["kitty"]).generate(PROMPTS[0], max_new_tokens=8)
    two_turns = ["--prompt-ids", "5,6,7", "--prompt-ids", "8,9", "--max-new-tokens", "3"]
    turns = cli("generate", str(artifacts["kitty"]), *two_turns)
    assert turns.returncode == 0, turns.stderr
    first, second = ([int(t) for t in line.split(",")] for line in turns.stdout.splitlines()[::2])
    with _model(artifacts["kitty"]).conversation() as chat:
        assert [chat.send([5, 6, 7], max_new_tokens=3), chat.send([8, 9], max_new_tokens=3)] == [first, second]
    shown = cli("inspect", str(artifacts["kitty"]))
    assert shown.returncode == 0, shown.stderr
    assert "KV cache: int2-kitty, 2 bits per element, " in shown.stdout
    assert "the first 16 and last 32 tokens of each sequence full precision (2048 bytes per token)" in shown.stdout
