"""DecoderModel end to end: random Llama / Qwen2 / OPT folders compiled to .tpk artifacts for the CPU,
loaded with the runtime, and checked against transformers' own greedy generate (32 new tokens, single
prompts and a ragged batch), first-step logits, the page pool's limits, streaming and sampling."""

from __future__ import annotations

import numpy as np
import pytest
from decoder_harness import ARCHITECTURES, compile_decoder, hf_greedy, hf_last_logits, make_hf_decoder

import tensorpress
from tensorpress.errors import InputError
from tensorpress.runtime.decoder import DecoderModel, sample_token
from tensorpress.runtime.paged_kv_cache import OutOfKVPagesError

NEW_TOKENS = 32
PROMPT_LENGTHS = (5, 17, 1, 33)


class Compiled:
    """One architecture: its folder, artifact, prompts and transformers' greedy continuations."""

    def __init__(self, arch: str, tmp):
        self.arch = arch
        self.folder = make_hf_decoder(arch, tmp / arch)
        self.artifact = compile_decoder(self.folder, tmp / f"{arch}.tpk")
        rng = np.random.default_rng(7)
        self.prompts = [rng.integers(3, 384, n).tolist() for n in PROMPT_LENGTHS]
        self.reference = hf_greedy(self.folder, self.prompts, NEW_TOKENS)

    def load(self, **options) -> DecoderModel:
        model = tensorpress.runtime.load(self.artifact)
        assert isinstance(model, DecoderModel)
        if options:  # a fresh page pool of another size on the same loaded artifact
            model = DecoderModel(model.artifact, **options)
        return model


@pytest.fixture(scope="module", params=ARCHITECTURES)
def compiled(request, tmp_path_factory) -> Compiled:
    return Compiled(request.param, tmp_path_factory.mktemp("decoders"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Compiled:
    return Compiled("llama", tmp_path_factory.mktemp("llama"))


def test_greedy_single_prompts_equal_transformers(compiled):
    model = compiled.load()
    for prompt, expected in zip(compiled.prompts[:2], compiled.reference[:2]):
        assert model.generate(prompt, max_new_tokens=NEW_TOKENS, stop_ids=[]) == expected


def test_greedy_ragged_batch_equals_transformers(compiled):
    model = compiled.load()
    assert model.generate(compiled.prompts, max_new_tokens=NEW_TOKENS, stop_ids=[]) == compiled.reference
    assert model.cache.num_free_pages == model.cache.num_pages  # every page came back


def test_first_step_logits_match_transformers(compiled):
    model = compiled.load()
    logits = model.next_token_logits(compiled.prompts)
    for prompt, ours in zip(compiled.prompts, logits):
        np.testing.assert_allclose(ours, hf_last_logits(compiled.folder, prompt), rtol=1e-4, atol=1e-4)


def test_teacher_forced_logprobs_match_transformers(compiled):
    import torch
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(compiled.folder).eval()
    texts = [compiled.prompts[1] + compiled.reference[1], compiled.prompts[3]]
    ours = compiled.load().token_logprobs(texts)
    for text, scores in zip(texts, ours):
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([text])).logits[0].double(), -1).numpy()
        expected = logp[np.arange(len(text) - 1), text[1:]]
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)


def test_a_prompt_larger_than_the_pool_is_refused_and_the_pool_stays_usable(llama):
    model = llama.load(max_total_tokens=48)  # 3 pages of 16 tokens
    with pytest.raises(OutOfKVPagesError, match="max_total_tokens"):
        model.generate(llama.prompts[3], max_new_tokens=NEW_TOKENS, stop_ids=[])  # 33 + 31 tokens
    assert model.cache.num_free_pages == model.cache.num_pages
    assert model.generate(llama.prompts[0], max_new_tokens=NEW_TOKENS, stop_ids=[]) == llama.reference[0]


def test_a_batch_larger_than_the_pool_waits_for_pages_and_stays_exact(llama):
    # needs 3 + 3 + 2 + 4 pages at their longest; 6 pages make it run in waves, reusing freed pages
    model = llama.load(max_total_tokens=96)
    assert model.generate(llama.prompts, max_new_tokens=NEW_TOKENS, stop_ids=[]) == llama.reference
    assert model.cache.num_free_pages == model.cache.num_pages


def test_memory_fraction_sizes_the_pool_from_free_memory(llama):
    model = DecoderModel(llama.load().artifact, memory_fraction=0.001)
    with open("/proc/meminfo") as meminfo:  # MemAvailable: free RAM plus what the kernel can reclaim
        free = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    page_bytes = 2 * 2 * 2 * 16 * 16 * 4  # layers, K/V, kv heads, page size, head dim, float32
    assert 0.7 <= model.cache.num_pages / (free * 0.001 / page_bytes) <= 1.3
    assert model.generate(llama.prompts[0], max_new_tokens=NEW_TOKENS, stop_ids=[]) == llama.reference[0]
    with pytest.raises(InputError, match="memory_fraction"):
        DecoderModel(llama.load().artifact, memory_fraction=1.5)


def test_stop_ids_end_a_sequence_after_the_stop_token(llama):
    model = llama.load()
    expected = llama.reference[1]
    stop = expected[6]
    cut = expected.index(stop) + 1
    out = model.generate([llama.prompts[1], llama.prompts[0]], max_new_tokens=NEW_TOKENS, stop_ids=[stop])
    assert out[0] == expected[:cut]
    assert model.cache.num_free_pages == model.cache.num_pages


def test_stream_yields_the_same_tokens_as_generate(llama):
    model = llama.load()
    seen: dict[int, list[int]] = {0: [], 1: []}
    for sequence, token in model.generate_stream(llama.prompts[:2], max_new_tokens=8, stop_ids=[]):
        seen[sequence].append(token)
    assert [seen[0], seen[1]] == [r[:8] for r in llama.reference[:2]]


def test_a_stream_abandoned_midway_gives_its_pages_back(llama):
    model = llama.load()
    stream = model.generate_stream(llama.prompts, max_new_tokens=NEW_TOKENS, stop_ids=[])
    for _ in range(6):
        next(stream)
    stream.close()
    assert model.cache.num_free_pages == model.cache.num_pages


def test_two_open_streams_share_the_pool_without_touching_each_other(llama):
    model = llama.load()
    halves = [llama.prompts[:2], llama.prompts[2:]]
    streams = [model.generate_stream(h, max_new_tokens=NEW_TOKENS, stop_ids=[]) for h in halves]
    outputs = [[[] for _ in h] for h in halves]
    active = {0, 1}
    while active:  # interleave the two generations step by step
        for i in sorted(active):
            event = next(streams[i], None)
            if event is None:
                active.discard(i)
            else:
                outputs[i][event.sequence].append(event.token)
    assert outputs[0] + outputs[1] == llama.reference
    assert model.cache.num_free_pages == model.cache.num_pages


def test_a_stream_cannot_take_pages_promised_to_another(llama):
    model = llama.load(max_total_tokens=64)  # 4 pages; prompt 0 is promised 3 of them
    first = model.generate_stream(llama.prompts[0], max_new_tokens=NEW_TOKENS, stop_ids=[])
    tokens = [next(first).token]
    second = model.generate_stream(llama.prompts[2], max_new_tokens=NEW_TOKENS, stop_ids=[])  # needs 2
    with pytest.raises(OutOfKVPagesError, match="another generation"):
        next(second)
    tokens += [event.token for event in first]
    assert tokens == llama.reference[0]


def test_sampling_is_seeded_and_independent_of_the_batch(llama):
    model = llama.load()
    options = dict(max_new_tokens=12, temperature=0.9, top_p=0.95, stop_ids=[], seed=3)
    alone = model.generate(llama.prompts[0], **options)
    assert model.generate(llama.prompts[0], **options) == alone
    assert model.generate(llama.prompts[:3], **options)[0] == alone
    assert model.generate(llama.prompts[0], **{**options, "seed": 4}) != alone
    nucleus_of_one = model.generate(llama.prompts[0], max_new_tokens=12, temperature=0.9, top_p=1e-9, stop_ids=[])
    assert nucleus_of_one == llama.reference[0][:12]


def test_bad_prompts_are_refused_with_input_errors(llama):
    model = llama.load()
    with pytest.raises(InputError, match="empty"):
        model.generate([[]], max_new_tokens=4)
    with pytest.raises(InputError, match="vocabulary"):
        model.generate([1, 2, 10_000], max_new_tokens=4)
    with pytest.raises(InputError, match="no tokenizer"):
        model.generate("hello", max_new_tokens=4)


def test_sample_token_keeps_the_nucleus_and_its_proportions():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = np.array([sample_token(logits, 1.0, 0.7, rng) for _ in range(4000)])
    assert set(draws.tolist()) == {0, 1}  # 0.5 + 0.3 is the smallest set with mass >= 0.7
    assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.03
    assert sample_token(logits, 0.0, 1.0, None) == 0


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_the_decoder_builds_for_cuda_with_real_gpu_code(llama, arch, tmp_path):
    from tensorpress.runtime.artifact import LIBRARY, open_artifact

    artifact = compile_decoder(llama.folder, tmp_path / "gpu.tpk", target=f"cuda:{arch}", dtype="float16")
    opened = open_artifact(artifact)
    assert opened.manifest["target"]["arch"] == arch
    assert {"kv_append", "paged_attention_prefill", "paged_attention_decode"} <= set(opened.manifest["kernels"])
    library = tmp_path / LIBRARY
    library.write_bytes(opened.read_member(LIBRARY))
    from tensorpress.compiler.cuda.toolchain import library_has_gpu_binary

    assert library_has_gpu_binary(library)


def _check_float16(folder, artifact, device: str) -> None:
    """A float16 build: logits within fp16 rounding of transformers' fp32, the same greedy tokens."""
    model = tensorpress.runtime.load(artifact, device=device)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 384, n).tolist() for n in PROMPT_LENGTHS]
    for prompt, logits in zip(prompts, model.next_token_logits(prompts)):
        np.testing.assert_allclose(logits, hf_last_logits(folder, prompt), rtol=1e-2, atol=1e-2)
    assert model.generate(prompts, max_new_tokens=NEW_TOKENS, stop_ids=[]) == hf_greedy(folder, prompts, NEW_TOKENS)


def test_float16_build_on_the_cpu(llama, tmp_path):
    artifact = compile_decoder(llama.folder, tmp_path / "llama16.tpk", dtype="float16")
    _check_float16(llama.folder, artifact, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_greedy_on_cuda_equals_transformers(arch, tmp_path):
    folder = make_hf_decoder(arch, tmp_path / arch)
    artifact = compile_decoder(folder, tmp_path / f"{arch}.tpk", target="cuda", dtype="float16")
    _check_float16(folder, artifact, "cuda")


def test_generation_needs_neither_tvm_nor_torch_nor_the_compiler(llama):
    """In a fresh process: load + generate with the runtime alone, then look at what got loaded."""
    import json
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import json, sys
        import tensorpress.runtime
        model = tensorpress.runtime.load({str(llama.artifact)!r})
        tokens = model.generate({llama.prompts[0]!r}, max_new_tokens=8, stop_ids=[])
        maps = open("/proc/self/maps").read()
        print(json.dumps({{
            "tokens": tokens,
            "heavy": sorted(m for m in ("torch", "tvm", "transformers") if m in sys.modules),
            "compiler": any(m.startswith("tensorpress.compiler") for m in sys.modules)
            or "libtvm_compiler" in maps,
        }}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts == {"tokens": llama.reference[0][:8], "heavy": [], "compiler": False}


def test_prefill_in_slices_gives_the_same_tokens(tmp_path):
    """A batch prefilled in calls of at most a few tokens generates what one whole prefill generates."""
    folder = make_hf_decoder("llama", tmp_path / "llama")
    artifact = compile_decoder(folder, tmp_path / "llama.tpk")
    prompts = [[1, 5, 9, 4], [1, 7], [1, 3, 3, 8, 2, 6]]
    whole = tensorpress.runtime.load(artifact).generate(prompts, max_new_tokens=6)
    sliced = tensorpress.runtime.load(artifact, max_prefill_tokens=5).generate(prompts, max_new_tokens=6)
    assert sliced == whole
