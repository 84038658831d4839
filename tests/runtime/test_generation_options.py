"""Every generate parameter is checked at the API edge, one sentence each, and the CLI shares those
checks; the model's context length is enforced unless the caller opts in."""

from __future__ import annotations

import math

import numpy as np
import pytest
from decoder_harness import compile_decoder, make_hf_decoder

import tensorpress
from tensorpress.cli import main
from tensorpress.errors import InputError
from tensorpress.runtime.generation_options import check_generation_options

BAD_OPTIONS = [
    (dict(max_new_tokens=2.5), "max_new_tokens must be a whole number"),
    (dict(max_new_tokens=-1), "max_new_tokens must be at least 0"),
    (dict(max_new_tokens=True), "max_new_tokens must be a whole number"),
    (dict(temperature=-1.0), "temperature must be 0 .greedy. or positive"),
    (dict(temperature=math.nan), "temperature must be a finite number"),
    (dict(temperature=math.inf), "temperature must be a finite number"),
    (dict(temperature="hot"), "temperature must be a number"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=math.nan), "top_p must be a finite number"),
    (dict(seed=-3), "seed must be at least 0"),
    (dict(seed=1.5), "seed must be a whole number"),
    (dict(stop_ids=[1, 2.5]), "each of stop_ids must be a whole number"),
    (dict(stop_ids="2"), "stop_ids must be a list of token ids"),
    (dict(allow_beyond_context="yes"), "allow_beyond_context must be True or False"),
]


@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=lambda v: str(v)[:40])
def test_each_bad_option_is_one_sentence(options, message):
    with pytest.raises(InputError, match=message) as err:
        check_generation_options(**options)
    assert "\n" not in str(err.value) and str(err.value).endswith(".")


def test_good_options_come_back_as_plain_python_values():
    options = check_generation_options(np.int64(4), 0.7, 0.9, np.array([2, 3]), np.uint32(5), np.bool_(True))
    assert (options.max_new_tokens, options.stop_ids, options.seed, options.allow_beyond_context) == (
        4,
        (2, 3),
        5,
        True,
    )
    assert type(options.max_new_tokens) is int and type(options.seed) is int


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama with 256 positions (decoder_harness.TINY)."""
    tmp = tmp_path_factory.mktemp("options")
    return compile_decoder(make_hf_decoder("llama", tmp / "llama"), tmp / "llama.tpk")


@pytest.mark.parametrize("options, message", BAD_OPTIONS[:8], ids=lambda v: str(v)[:40])
def test_generate_refuses_bad_options_before_any_work(llama, options, message):
    model = tensorpress.runtime.load(llama)
    with pytest.raises(InputError, match=message):
        model.generate([1, 2, 3], **options)
    with pytest.raises(InputError, match=message):
        model.generate_stream([1, 2, 3], **options)  # at the call, not at the first token


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([], "the prompt is empty"),
        (np.zeros(0, np.int64), "the prompt is empty"),
        ([[1, 2], []], "prompt 1 is empty"),
        ([1.5, 2.0], "not a token id"),
        ([[1, 2], [3, -4]], "prompt 1 holds the negative token id -4"),
        (7, "a prompt is a text or a list of token ids"),
    ],
)
def test_bad_prompts_are_one_sentence(llama, prompt, message):
    with pytest.raises(InputError, match=message):
        tensorpress.runtime.load(llama).generate(prompt, max_new_tokens=2)


def test_the_context_length_is_recorded_and_enforced_unless_the_caller_opts_in(llama):
    model = tensorpress.runtime.load(llama)
    assert model.context_length == 256
    fits = list(range(3, 253))  # 250 prompt + 6 new = 256 positions: allowed
    assert len(model.generate(fits, max_new_tokens=6, stop_ids=[])) == 6
    with pytest.raises(InputError, match="exceed the model's context length of 256 tokens") as err:
        model.generate(fits, max_new_tokens=7)
    assert "allow_beyond_context=True" in str(err.value)
    past = model.generate(fits, max_new_tokens=7, stop_ids=[], allow_beyond_context=True)
    assert len(past) == 7 and past[:6] == model.generate(fits, max_new_tokens=6, stop_ids=[])
    with pytest.raises(InputError, match="context length"):
        model.token_logprobs(list(range(3, 300)))


def test_the_out_of_pages_message_names_a_pool_size_within_the_context(llama):
    from tensorpress.runtime.decoder import DecoderModel
    from tensorpress.runtime.paged_kv_cache import OutOfKVPagesError

    model = DecoderModel(tensorpress.runtime.load(llama).artifact, max_total_tokens=16)
    with pytest.raises(OutOfKVPagesError, match="raise max_total_tokens to at least 48"):
        model.generate(list(range(3, 40)), max_new_tokens=4)  # 37 + 3 cached tokens: 3 pages of 16
    with pytest.raises(InputError, match="context length"):  # never told to grow the pool past 256
        model.generate(list(range(3, 250)), max_new_tokens=40)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt-ids", ""], "--prompt-ids is empty"),
        (["--prompt-ids", "1,2", "--prompt-ids", ""], "--prompt-ids of turn 2 is empty"),
        (["--prompt", "Hi", "--prompt", ""], "--prompt of turn 2 is empty"),
        (["--prompt-ids", "1,2", "--temperature", "-1"], "temperature must be 0"),
        (["--prompt-ids", "1,2", "--temperature", "nan"], "temperature must be a finite number"),
        (["--prompt-ids", "1,2", "--top-p", "0"], "top_p must be in"),
        (["--prompt-ids", "1,2", "--max-new-tokens", "-2"], "max_new_tokens must be at least 0"),
        (["--prompt-ids", ",".join(["5"] * 250), "--max-new-tokens", "10"], "context length of 256"),
    ],
)
def test_the_cli_shares_the_checks(llama, capsys, flags, message):
    assert main(["generate", str(llama), *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_the_cli_opts_in_past_the_context(llama, capsys):
    flags = ["--prompt-ids", ",".join(["5"] * 250), "--max-new-tokens", "10", "--stop-ids", ""]
    assert main(["generate", str(llama), *flags, "--allow-beyond-context"]) == 0
    assert len(capsys.readouterr().out.splitlines()[0].split(",")) == 10
