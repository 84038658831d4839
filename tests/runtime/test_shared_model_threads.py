"""One loaded model shared by threads (what a server does first): a graph model with a dynamic batch
and a DecoderModel's generate, hammered by several threads at once, give exactly the single-threaded
answers. Run in a subprocess: before each thread had its own VM state, this crashed the process
(TVM "Check failed: reg < frame->register_file.size()", then SIGSEGV)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from decoder_harness import compile_decoder, make_hf_decoder
from reference_models import export_onnx

import tensorpress

HAMMER = textwrap.dedent(
    """
    import sys, threading
    import numpy as np
    import tensorpress.runtime
    from tensorpress.runtime.decoder import DecoderModel

    graph_path, decoder_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    graph = tensorpress.runtime.load(graph_path)
    inputs = [np.random.default_rng(i).standard_normal((1 + i % 5, 64)).astype(np.float32) for i in range(8)]
    graph_reference = [graph.run({"x": x})[0] for x in inputs]
    decoder = tensorpress.runtime.load(decoder_path)
    prompts = [np.random.default_rng(i).integers(3, 384, 2 + 3 * i).tolist() for i in range(4)]
    options = dict(max_new_tokens=6, stop_ids=[])
    decoder_reference = [decoder.generate(p, **options) for p in prompts]
    # a pool of 2 pages of 16 tokens: most threads must wait for another's pages
    small_pool = DecoderModel(decoder.artifact, max_total_tokens=32)
    failures = []

    def hammer(i):
        try:
            for k in range(40):
                j = (i + k) % 8
                assert np.array_equal(graph.run({"x": inputs[j]})[0], graph_reference[j]), "graph"
                if k % 4 == 0:
                    p = (i + k) % 4
                    assert decoder.generate(prompts[p], **options) == decoder_reference[p], "decoder"
                    assert small_pool.generate(prompts[p], **options) == decoder_reference[p], "small pool"
        except BaseException as err:
            failures.append(repr(err))

    workers = [threading.Thread(target=hammer, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not failures, failures
    assert small_pool.cache.num_free_pages == small_pool.cache.num_pages  # every page came back
    print("ok")
    """
)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("threads")
    graph = tensorpress.compile(export_onnx("mlp", tmp), tmp / "mlp.tpk").artifact  # batch is dynamic
    decoder = compile_decoder(make_hf_decoder("llama", tmp / "llama"), tmp / "llama.tpk")
    return graph, decoder


def test_threads_sharing_one_model_get_the_single_threaded_answers(artifacts):
    graph, decoder = artifacts
    done = subprocess.run(
        [sys.executable, "-c", HAMMER, str(graph), str(decoder), "4"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.strip() == "ok"
