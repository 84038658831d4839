"""The paged KV kernels on a GPU (from the GPU kit) against a float64 torch reference: ragged decode with
contexts up to 2048, ragged prefill, GQA 1/4/7/8, the append, and bit-identical results run to run.

Runs where the kit is prepared (TENSORPRESS_GPU_KIT, set by benchmarks/kit/run.py): on the GPU machine,
or in the kit's dry run on the CPU with the same CUDA schedules replayed for llvm. Elsewhere it skips,
except where a CUDA device is visible: there a missing kit fails the collection (never a silent skip).
Imports neither TVM nor tensorpress's compiler.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from gpu_kit import fail_where_cuda_is_visible

torch = pytest.importorskip("torch")
KIT = os.environ.get("TENSORPRESS_GPU_KIT")
if not KIT or not (Path(KIT) / "manifest.json").exists():
    fail_where_cuda_is_visible("TENSORPRESS_GPU_KIT names no prepared GPU kit, so the KV-attention kernels are missing")
    pytest.skip("needs a prepared GPU kit (benchmarks/kit/run.py sets TENSORPRESS_GPU_KIT)", allow_module_level=True)
MANIFEST = json.loads((Path(KIT) / "manifest.json").read_text())
DRY = bool(MANIFEST["dry"])
SECTION = MANIFEST["decoders"]["attention_kernels"]
pytestmark = [] if DRY else [pytest.mark.gpu]
PS = SECTION["page_size"]
LAYERS, LAYER = 2, 1
TOLERANCE = 2e-3  # fp16 output of fp32 sums


def _device():
    return torch.device("cpu" if DRY else "cuda")


def _library():
    from tensorpress.runtime import tvm_runtime

    if not DRY:
        tvm_runtime.device("cuda")  # loads TVM's CUDA runtime (the fatbin loader)
    return tvm_runtime.ffi().load_module(str(Path(KIT) / SECTION["library"]))


LIBRARY = None


def kernel(name):
    global LIBRARY
    if LIBRARY is None:
        LIBRARY = _library()
    return LIBRARY[name]


def make_batch(heads, kv_heads, head_dim, lengths, new, seed):
    """Pages in shuffled order, every token's K/V in place; queries for the last `new` tokens."""
    g = torch.Generator().manual_seed(seed)
    pages_each = [-(-n // PS) for n in lengths]
    num_pages = sum(pages_each) + 1
    order = torch.randperm(num_pages, generator=g)
    table = torch.zeros((len(lengths), max(pages_each) + 1), dtype=torch.int32)
    taken = 0
    for s, count in enumerate(pages_each):
        table[s, :count] = order[taken : taken + count]
        taken += count
    pool = torch.randn((LAYERS, num_pages, 2, kv_heads, PS, head_dim), generator=g).half()
    positions = torch.cat([torch.arange(n - k, n) for n, k in zip(lengths, new)]).int()
    seq_slot = torch.cat([torch.full((k,), s) for s, k in enumerate(new)]).int()
    q = torch.randn((len(positions), heads, head_dim), generator=g).half()
    return pool, table, positions, seq_slot, q


def reference(pool, table, positions, seq_slot, q):
    heads, head_dim = q.shape[1:]
    group = heads // pool.shape[3]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(len(positions)):
        t = torch.arange(int(positions[i]) + 1)
        pages = table[int(seq_slot[i]), t // PS].long()
        k = pool[LAYER, pages, 0, :, t % PS].double()  # [T, KVH, D]
        v = pool[LAYER, pages, 1, :, t % PS].double()
        for h in range(heads):
            w = torch.softmax(k[:, h // group] @ q[i, h].double() / head_dim**0.5, 0)
            out[i, h] = w @ v[:, h // group]
    return out


def run_attention(phase, config, batch):
    pool, table, positions, seq_slot, q = (t.to(_device()) for t in batch)
    out = torch.full(q.shape, float("nan"), dtype=torch.float16, device=_device())
    from tensorpress.runtime import tvm_runtime

    ffi = tvm_runtime.ffi()
    kernel(f"kv_{phase}_{config['tag']}")(
        *[ffi.from_dlpack(t) for t in (q, pool, positions, seq_slot, table)], LAYER, ffi.from_dlpack(out)
    )
    if _device().type == "cuda":
        torch.cuda.synchronize()
    return out.cpu()


CONFIGS = SECTION["configs"]
DECODE_LENGTHS = [[1, 17, 64, 65, 300, 2048], [2048] * 4] if not DRY else [[1, 17, 64, 65, 150]]
PREFILL = ([100, 37, 130], [100, 5, 1]) if not DRY else ([40, 9, 70], [8, 3, 2])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["tag"])
@pytest.mark.parametrize("lengths", DECODE_LENGTHS, ids=lambda n: f"{len(n)}seq")
def test_decode_matches_a_float64_reference(config, lengths):
    batch = make_batch(config["heads"], config["kv_heads"], config["head_dim"], lengths, [1] * len(lengths), seed=1)
    out = run_attention("decode", config, batch)
    expected = reference(*batch)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["tag"])
def test_prefill_matches_a_float64_reference(config):
    lengths, new = PREFILL
    batch = make_batch(config["heads"], config["kv_heads"], config["head_dim"], lengths, new, seed=2)
    out = run_attention("prefill", config, batch)
    torch.testing.assert_close(out.double(), reference(*batch), rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("config", CONFIGS[:2], ids=lambda c: c["tag"])
def test_decode_is_bit_identical_run_to_run(config):
    lengths = DECODE_LENGTHS[0]
    batch = make_batch(config["heads"], config["kv_heads"], config["head_dim"], lengths, [1] * len(lengths), seed=3)
    first = run_attention("decode", config, batch)
    for _ in range(3):
        assert torch.equal(run_attention("decode", config, batch), first)


@pytest.mark.parametrize("config", CONFIGS[:2], ids=lambda c: c["tag"])
def test_append_writes_exactly_the_addressed_rows(config):
    from tensorpress.runtime import tvm_runtime

    lengths, new = PREFILL
    pool, table, positions, seq_slot, _ = make_batch(
        config["heads"], config["kv_heads"], config["head_dim"], lengths, new, seed=4
    )
    g = torch.Generator().manual_seed(5)
    k = torch.randn((len(positions), config["kv_heads"], config["head_dim"]), generator=g).half()
    v = torch.randn(k.shape, generator=g).half()
    expected = pool.clone()
    for i in range(len(positions)):
        page = table[int(seq_slot[i]), int(positions[i]) // PS]
        expected[LAYER, page, 0, :, int(positions[i]) % PS] = k[i]
        expected[LAYER, page, 1, :, int(positions[i]) % PS] = v[i]
    on = [t.to(_device()) for t in (pool, k, v, positions, seq_slot, table)]
    ffi = tvm_runtime.ffi()
    kernel(f"kv_append_{config['tag']}")(*[ffi.from_dlpack(t) for t in on], LAYER)
    assert torch.equal(on[0].cpu(), expected)
