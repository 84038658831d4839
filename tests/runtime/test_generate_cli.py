"""`tensorpress generate`: stdout line 1 = new token ids (what transformers' greedy generate gives),
then the text when there is a tokenizer; tokens/s on stderr; clear errors."""

from __future__ import annotations

import pytest
from decoder_harness import compile_decoder, hf_greedy, make_hf_decoder

from tensorpress.cli import main


@pytest.fixture(scope="module")
def opt_artifact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    folder = make_hf_decoder("opt", tmp / "opt")
    return folder, compile_decoder(folder, tmp / "opt.tpk")


def test_prompt_ids_print_the_greedy_token_ids_first(opt_artifact, capsys):
    folder, artifact = opt_artifact
    prompt = [5, 77, 300, 12, 9]
    assert main(["generate", str(artifact), "--prompt-ids", ",".join(map(str, prompt)), "--stop-ids", ""]) == 0
    out, err = capsys.readouterr()
    first_line = out.splitlines()[0]
    assert [int(t) for t in first_line.split(",")] == hf_greedy(folder, [prompt], 32)[0]
    assert "tokens/s" in err.splitlines()[-1]


def test_generation_options_reach_the_model(opt_artifact, capsys):
    _, artifact = opt_artifact
    args = ["generate", str(artifact), "--prompt-ids", "5,6,7", "--max-new-tokens", "5"]
    sampled = args + ["--temperature", "1.0", "--top-p", "0.9", "--seed", "11", "--stop-ids", ""]
    main(sampled)
    first = capsys.readouterr().out.splitlines()[0]
    main(sampled)
    assert capsys.readouterr().out.splitlines()[0] == first and len(first.split(",")) == 5
    main(args + ["--max-total-tokens", "16", "--stop-ids", ""])
    assert len(capsys.readouterr().out.splitlines()[0].split(",")) == 5
    main(args + ["--memory-fraction", "0.001", "--stop-ids", ""])
    assert len(capsys.readouterr().out.splitlines()[0].split(",")) == 5


def test_text_without_a_tokenizer_and_a_small_pool_are_one_line_errors(opt_artifact, capsys):
    _, artifact = opt_artifact
    assert main(["generate", str(artifact), "--prompt", "hello"]) == 1
    assert "no tokenizer" in capsys.readouterr().err
    assert main(["generate", str(artifact), "--prompt-ids", "1,2,3", "--max-total-tokens", "16"]) == 1
    err = capsys.readouterr().err
    assert "KV pages" in err and len(err.strip().splitlines()) == 1


def test_a_graph_artifact_is_refused(tmp_path, capsys):
    import torch

    import tensorpress

    linear = torch.nn.Linear(4, 4)
    artifact = tmp_path / "linear.tpk"
    tensorpress.compile(linear, artifact, example_inputs=(torch.ones(2, 4),))
    assert main(["generate", str(artifact), "--prompt-ids", "1"]) == 1
    assert "not a decoder" in capsys.readouterr().err


def test_run_on_a_decoder_says_to_use_generate(opt_artifact, tmp_path, capsys):
    import numpy as np

    import tensorpress
    from tensorpress.errors import InputError

    _, artifact = opt_artifact
    np.savez(tmp_path / "in.npz", input_ids=np.zeros(3, np.int32))
    assert main(["run", str(artifact), "--inputs", str(tmp_path / "in.npz"), "--output", str(tmp_path / "o.npz")]) == 1
    err = capsys.readouterr().err
    assert "use `tensorpress generate`" in err or "with `tensorpress generate`" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o.npz").exists()
    with pytest.raises(InputError, match=r"call generate\(\), not run\(\)"):
        tensorpress.runtime.load(artifact).run({"input_ids": np.zeros(3, np.int32)})


def test_a_pool_too_large_for_memory_is_refused_before_allocating(opt_artifact, capsys):
    _, artifact = opt_artifact
    huge = str(10**13)  # petabytes of KV cache: would be std::bad_alloc, or an overcommitted pool
    assert main(["generate", str(artifact), "--prompt-ids", "1,2,3", "--max-total-tokens", huge]) == 1
    err = capsys.readouterr().err
    assert "GiB free; lower max_total_tokens" in err and len(err.strip().splitlines()) == 1
