"""FuseParallelLinears: linears reading one input (q/k/v, a GQA layer's q/k/v, gate/up) compile to one weight
GEMM over their stacked weights; the model still gives torch's float64 answers and the unfused build's,
with dense, fp6, int8 and sparse weights, and the manifest and `inspect` still say what each weight became."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tensorpress
from tensorpress.compiler import pipeline
from tensorpress.compiler.passes.fuse_parallel_linears import FUSED_LINEARS_INFO, FuseParallelLinears, stacked_name
from tensorpress.frontend import import_model
from tensorpress.runtime.inspect_artifact import describe_artifact


class BertBlock(torch.nn.Module):
    """MiniLM's layer: q/k/v with biases, attention, output + residual + LayerNorm, GELU MLP + residual."""

    def __init__(self, dim: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.output = torch.nn.Linear(dim, dim)
        self.ln1, self.ln2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.intermediate = torch.nn.Linear(dim, 2 * dim)
        self.out2 = torch.nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        split = [z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self._qkv(x)]
        attn = torch.softmax(split[0] @ split[1].transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ split[2]
        x = self.ln1(x + self.output(attn.transpose(1, 2).reshape(b, t, d)))
        return self.ln2(x + self.out2(torch.nn.functional.gelu(self.intermediate(x))))

    def _qkv(self, x):
        return self.query(x), self.key(x), self.value(x)


class LlamaBlock(torch.nn.Module):
    """A Llama layer with grouped-query attention (4 query heads, 2 KV heads), RoPE on q and k, SwiGLU."""

    def __init__(self, dim: int = 64, heads: int = 4, kv_heads: int = 2, hidden: int = 96):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = torch.nn.Linear(dim, dim, bias=False)
        self.k_proj = torch.nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = torch.nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = torch.nn.Linear(dim, dim, bias=False)
        self.gate_proj = torch.nn.Linear(dim, hidden, bias=False)
        self.up_proj = torch.nn.Linear(dim, hidden, bias=False)
        self.down_proj = torch.nn.Linear(hidden, dim, bias=False)
        self.norm1, self.norm2 = torch.nn.RMSNorm(dim, eps=1e-6), torch.nn.RMSNorm(dim, eps=1e-6)

    def _rope(self, z):
        t, half = z.shape[2], self.head_dim // 2
        freq = 1.0 / 10000 ** (torch.arange(half, dtype=z.dtype) / half)
        angle = torch.arange(t, dtype=z.dtype)[:, None] * freq[None, :]
        cos, sin = torch.cos(angle), torch.sin(angle)
        a, b = z[..., :half], z[..., half:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        q = self._rope(self.q_proj(h).reshape(b, t, self.heads, self.head_dim).transpose(1, 2))
        k = self._rope(self.k_proj(h).reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2))
        v = self.v_proj(h).reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim**0.5, dim=-1) @ v
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


def _compile(module, x, tmp_path, name, **options):
    report = tensorpress.compile(module, tmp_path / f"{name}.tpk", example_inputs=(x,), target="cpu", **options)
    model = tensorpress.runtime.load(report.artifact, device="cpu")
    (got,) = model.run({model.signature.inputs[0].name: x.numpy()})
    return report, got


def _compile_unfused(module, x, tmp_path, monkeypatch, **options):
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "fuse_parallel_linears", lambda imported, *rest: (imported, {}))
        return _compile(module, x, tmp_path, "unfused", **options)


def _float64_reference(module, x) -> np.ndarray:
    with torch.no_grad():
        return module.double()(x.double()).numpy()


def _fused_groups(manifest) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for layer in manifest["layers"]:
        if "fused_into" in layer:
            groups.setdefault(layer["fused_into"], []).append(layer["weight"])
    return groups


def _weight_gemms(manifest) -> list[str]:
    return [k for k in manifest["kernels"] if k.startswith("weight_gemm")]


def test_bert_block_q_k_v_become_one_gemm_and_match_float64_torch(tmp_path):
    torch.manual_seed(0)
    module, x = BertBlock().eval(), torch.randn(2, 16, 64)
    report, got = _compile(module, x, tmp_path, "fused", tuning_log=False)
    members = ["query.weight", "key.weight", "value.weight"]
    assert _fused_groups(report.manifest) == {"{query,key,value}.weight": members}
    gemms = _weight_gemms(report.manifest)
    assert any("_192x64_float32_bias_n" in k for k in gemms), gemms  # q, k, v: 3 x 64 rows, biases stacked
    assert not any("_64x64_float32_bias_n" in k for k in gemms), gemms  # no q/k/v kernel of its own
    assert any("_gelu" in k for k in gemms) and any("_residual" in k for k in gemms), gemms  # epilogues kept
    np.testing.assert_allclose(got, _float64_reference(module, x), rtol=1e-4, atol=1e-4)


def test_llama_block_with_gqa_fuses_q_k_v_and_gate_up_without_bias(tmp_path):
    torch.manual_seed(1)
    module, x = LlamaBlock().eval(), torch.randn(1, 12, 64)
    report, got = _compile(module, x, tmp_path, "fused", tuning_log=False)
    assert _fused_groups(report.manifest) == {
        "{q_proj,k_proj,v_proj}.weight": ["q_proj.weight", "k_proj.weight", "v_proj.weight"],
        "{gate_proj,up_proj}.weight": ["gate_proj.weight", "up_proj.weight"],
    }
    gemms = _weight_gemms(report.manifest)
    assert any("_128x64_float32_n" in k for k in gemms), gemms  # q 64 + k 32 + v 32 rows (2 KV heads)
    assert any("_192x64_float32_n" in k for k in gemms), gemms  # gate 96 + up 96 rows
    np.testing.assert_allclose(got, _float64_reference(module, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "options, tolerance",
    [
        ({"weights": "fp6"}, 0.15),
        ({"weights": "int8"}, 0.05),
        ({"sparsity": tensorpress.SparseConfig(0.5, format="ellpack")}, None),
    ],
    ids=["fp6", "int8", "ellpack-50%"],
)
def test_compressed_weights_fuse_and_give_the_unfused_answers(options, tolerance, tmp_path, monkeypatch):
    torch.manual_seed(2)
    module, x = LlamaBlock().eval(), torch.randn(2, 8, 64)
    report, got = _compile(module, x, tmp_path, "fused", tuning_log=False, **options)
    _, unfused = _compile_unfused(module, x, tmp_path, monkeypatch, tuning_log=False, **options)
    groups = _fused_groups(report.manifest)
    assert sorted(groups) == ["{gate_proj,up_proj}.weight", "{q_proj,k_proj,v_proj}.weight"]
    layers = {layer["weight"]: layer for layer in report.manifest["layers"]}
    fmt = layers["o_proj.weight"]["stored_format"]
    assert all(layers[w]["stored_format"] == fmt for members in groups.values() for w in members)
    # Every format stores W row by row, so the stacked weight holds the members' rows as they were.
    np.testing.assert_allclose(got, unfused, rtol=2e-5, atol=2e-5)
    if tolerance is not None:  # pruning changes the model itself: the unfused build is the reference
        np.testing.assert_allclose(got, _float64_reference(module, x), rtol=tolerance, atol=tolerance)


def test_layers_stored_differently_stay_apart_and_inspect_names_each_weight(tmp_path):
    torch.manual_seed(3)
    module, x = LlamaBlock().eval(), torch.randn(1, 8, 64)
    report, got = _compile(module, x, tmp_path, "fused", weights="fp6", skip=["k_proj*"], tuning_log=False)
    groups = _fused_groups(report.manifest)
    assert groups["{q_proj,v_proj}.weight"] == ["q_proj.weight", "v_proj.weight"]  # k_proj stays dense, alone
    layers = {layer["weight"]: layer for layer in report.manifest["layers"]}
    assert "fused_into" not in layers["k_proj.weight"] and layers["k_proj.weight"]["format"] != "fp6"
    assert layers["q_proj.weight"]["format"] == "fp6"
    # a member's stored bytes are its rows' share of the stacked weight
    assert layers["q_proj.weight"]["stored_bytes"] == 2 * layers["v_proj.weight"]["stored_bytes"]
    text = describe_artifact(report.artifact)
    q_line = next(line for line in text.splitlines() if line.strip().startswith("q_proj.weight"))
    assert "rows of {q_proj,v_proj}.weight" in q_line and "fp6" in q_line
    np.testing.assert_allclose(got, _float64_reference(module, x), rtol=0.15, atol=0.15)


def test_a_linear_whose_gelu_fuses_into_its_store_is_not_stacked(tmp_path):
    class TwoHeads(torch.nn.Module):  # both read x; one feeds a GELU (an epilogue), one does not
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(32, 48), torch.nn.Linear(32, 16), torch.nn.Linear(32, 16)

        def forward(self, x):
            return torch.nn.functional.gelu(self.a(x)).sum(-1, keepdim=True) * self.b(x) - self.c(x)

    torch.manual_seed(4)
    module, x = TwoHeads().eval(), torch.randn(3, 32)
    report, got = _compile(module, x, tmp_path, "fused", tuning_log=False)
    assert _fused_groups(report.manifest) == {"{b,c}.weight": ["b.weight", "c.weight"]}
    assert any("_48x32_float32_bias_gelu" in k for k in _weight_gemms(report.manifest))
    np.testing.assert_allclose(got, _float64_reference(module, x), rtol=1e-4, atol=1e-4)


def test_only_the_epilogues_the_rewrite_pass_fuses_keep_a_linear_apart(tmp_path):
    """A residual add (a tensor of the linear's own shape) is fused into its GEMM's store, so that linear
    stays alone; an add that broadcasts is not an epilogue, so its linear still stacks."""

    class Readers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.b, self.c, self.d = torch.nn.Linear(32, 16), torch.nn.Linear(32, 16), torch.nn.Linear(32, 16)

        def forward(self, x):
            residual = x[:, :16] * 2
            return (self.b(x) + residual) * (self.c(x) + x[:, :1]) - self.d(x)

    torch.manual_seed(5)
    module, x = Readers().eval(), torch.randn(3, 32)
    report, got = _compile(module, x, tmp_path, "fused", tuning_log=False)
    assert _fused_groups(report.manifest) == {"{c,d}.weight": ["c.weight", "d.weight"]}
    assert any("_16x32_float32_bias_residual" in k for k in _weight_gemms(report.manifest))
    np.testing.assert_allclose(got, _float64_reference(module, x), rtol=1e-4, atol=1e-4)


def test_stacked_name_keeps_what_the_names_share():
    names = [f"model.layers.0.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")]
    assert stacked_name(names) == "model.layers.0.self_attn.{q_proj,k_proj,v_proj}.weight"
    assert stacked_name(["up", "gate"]) == "{up,gate}"
    assert stacked_name(["a.x.w", "a.y.z.w"]) == "a.{x,y.z}.w"


def test_shapes_only_weights_stay_broadcasts_when_stacked():
    """store_weights=False imports weights as zero-stride zeros: stacking them must not allocate the model."""
    imported = import_model(LlamaBlock().eval(), example_inputs=(torch.randn(1, 4, 64),))
    imported.params = {n: np.broadcast_to(np.zeros((), a.dtype), a.shape) for n, a in imported.params.items()}
    fused = FuseParallelLinears(lambda weight: "one format")(imported)
    assert sorted(fused.info[FUSED_LINEARS_INFO]) == ["{gate_proj,up_proj}.weight", "{q_proj,k_proj,v_proj}.weight"]
    qkv = fused.params["{q_proj,k_proj,v_proj}.weight"]
    assert qkv.shape == (128, 64) and not any(qkv.strides)
    assert "q_proj.weight" not in fused.params  # the members are gone where nothing reads them
