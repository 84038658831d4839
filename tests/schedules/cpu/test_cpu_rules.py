"""All CPU rules together (`cpu_rules()`): a transformer block with symbolic batch and sequence,
every kernel scheduled, the compiled block matching torch."""

import numpy as np
import pytest
import tvm
from cpu_schedule_harness import AVX2
from tvm import relax, tirx
from tvm.s_tir import dlight as dl

from tensorpress.schedules.cpu import cpu_rules

torch = pytest.importorskip("torch")


class Block(torch.nn.Module):
    """Pre-LN attention + GELU MLP, the shapes of a small BERT layer."""

    def __init__(self, hidden=64, heads=4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(hidden), torch.nn.LayerNorm(hidden)
        self.qkv, self.out = torch.nn.Linear(hidden, 3 * hidden), torch.nn.Linear(hidden, hidden)
        self.up, self.down = torch.nn.Linear(hidden, 2 * hidden), torch.nn.Linear(2 * hidden, hidden)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        scores = torch.softmax(q @ k.transpose(-1, -2) * (h // self.heads) ** -0.5, dim=-1)
        x = x + self.out((scores @ v).transpose(1, 2).reshape(b, s, h))
        return x + self.down(torch.nn.functional.gelu(self.up(self.ln2(x))))


def test_transformer_block_matches_torch():
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(0)
    model = Block().eval()
    batch, seq = torch.export.Dim("batch", max=16), torch.export.Dim("seq", max=256)
    program = torch.export.export(model, (torch.randn(2, 8, 64),), dynamic_shapes=({0: batch, 1: seq},))
    mod = from_exported_program(program, unwrap_unit_return_tuple=True)
    lowering = tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
    )
    with AVX2:
        mod = dl.ApplyDefaultSchedule(*cpu_rules())(lowering(mod))
    unscheduled = [
        gv.name_hint
        for gv, f in mod.functions_items()
        if isinstance(f, tirx.PrimFunc) and "tirx.is_scheduled" not in f.attrs
    ]
    assert unscheduled == []
    vm = relax.VirtualMachine(tvm.compile(mod, target=AVX2), tvm.cpu())
    for b, s in ((1, 1), (2, 7), (1, 33)):
        x = torch.randn(b, s, 64)
        with torch.no_grad():
            expected = model(x).numpy()
        actual = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
