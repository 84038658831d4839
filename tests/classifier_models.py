"""Classic image classifiers at reduced size, written with torch.nn (torchvision is not a dependency):
ResNet-50 (bottleneck blocks), MobileNet-v2 (inverted residuals, depthwise convs, ReLU6), DenseNet
(dense blocks of concatenations), VGG and AlexNet (conv stacks, max pooling, big Linear heads, dropout).

`width` scales every channel count and `resolution` the input side; width=1.0 and resolution=224 are
the published shapes (with 1000 classes). Weights are random (seeded); the tests compare against
onnxruntime on the same ONNX file, so only the shapes matter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _c(channels: int, width: float) -> int:
    return max(4, int(round(channels * width / 4)) * 4)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int):
        super().__init__()
        cout = mid * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet50(width: float = 1.0, blocks=(3, 4, 6, 3), classes: int = 1000) -> nn.Module:
    stem = _c(64, width)
    layers: list[nn.Module] = [
        nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
    ]  # fmt: skip
    cin = stem
    for stage, count in enumerate(blocks):
        mid = _c(64 * 2**stage, width)
        for i in range(count):
            layers.append(Bottleneck(cin, mid, 2 if i == 0 and stage > 0 else 1))
            cin = mid * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.use_skip = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip

    def forward(self, x):
        return x + self.body(x) if self.use_skip else self.body(x)


def mobilenet_v2(width: float = 1.0, classes: int = 1000, max_repeats: int = 4) -> nn.Module:
    # (expansion, channels, repeats, stride) as in the paper
    settings = [
        (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)
    ]  # fmt: skip
    cin = _c(32, width)
    layers: list[nn.Module] = [nn.Conv2d(3, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True)]
    for t, c, n, s in settings:
        cout = _c(c, width)
        for i in range(min(n, max_repeats)):
            layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
            cin = cout
    last = _c(1280, width)
    layers += [
        nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(last, classes),
    ]  # fmt: skip
    return nn.Sequential(*layers)


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True), nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False),
        )  # fmt: skip

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


def densenet(width: float = 1.0, blocks=(6, 12, 24, 16), classes: int = 1000) -> nn.Module:
    growth = _c(32, width)
    cin = 2 * growth
    layers: list[nn.Module] = [
        nn.Conv2d(3, cin, 7, 2, 3, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
    ]  # fmt: skip
    for i, count in enumerate(blocks):
        for _ in range(count):
            layers.append(DenseLayer(cin, growth))
            cin += growth
        if i != len(blocks) - 1:
            layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cin // 2, 1, bias=False)]
            layers.append(nn.AvgPool2d(2, 2))
            cin //= 2
    layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    layers.append(nn.Linear(cin, classes))
    return nn.Sequential(*layers)


def vgg16(width: float = 1.0, hidden: int = 4096, classes: int = 1000, resolution: int = 224) -> nn.Module:
    layers: list[nn.Module] = []
    cin = 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            cout = _c(int(v), width)
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
            cin = cout
    side = resolution // 32
    layers += [
        nn.Flatten(), nn.Linear(cin * side * side, hidden), nn.ReLU(inplace=True), nn.Dropout(),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(hidden, classes),
    ]  # fmt: skip
    return nn.Sequential(*layers)


def alexnet(width: float = 1.0, hidden: int = 4096, classes: int = 1000) -> nn.Module:
    c = [_c(n, width) for n in (64, 192, 384, 256, 256)]
    return nn.Sequential(
        nn.Conv2d(3, c[0], 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(c[0], c[1], 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c[3], c[4], 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.AdaptiveAvgPool2d(6), nn.Flatten(),
        nn.Dropout(), nn.Linear(c[4] * 36, hidden), nn.ReLU(inplace=True),
        nn.Dropout(), nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, classes),
    )  # fmt: skip


# name -> (builder at reduced size, input side); the small settings keep a compile to seconds.
SMALL = {
    "resnet50": (lambda: resnet50(width=0.125, blocks=(1, 1, 1, 1), classes=100), 64),
    "mobilenet_v2": (lambda: mobilenet_v2(width=0.25, classes=100, max_repeats=1), 64),
    "densenet": (lambda: densenet(width=0.25, blocks=(1, 2, 1, 1), classes=100), 64),
    "vgg16": (lambda: vgg16(width=0.125, hidden=256, classes=100, resolution=64), 64),
    "alexnet": (lambda: alexnet(width=0.125, hidden=256, classes=100), 224),  # 6x6 before the head
}
FULL = {
    "resnet50": (lambda: resnet50(), 224),
    "mobilenet_v2": (lambda: mobilenet_v2(), 224),
    "densenet": (lambda: densenet(), 224),
    "vgg16": (lambda: vgg16(), 224),
    "alexnet": (lambda: alexnet(), 224),
}


def export_classifier(
    name: str, folder: Path, batch: int | None = None, full_size: bool = False, seed: int = 0
) -> tuple[Path, int]:
    """Export the classifier `name` (eval mode, random weights) to `folder` with torch's legacy exporter,
    for a fixed `batch` (as most deployments export) or a symbolic one (None); returns (path, input side)."""
    build, side = (FULL if full_size else SMALL)[name]
    torch.manual_seed(seed)
    model = build().eval()
    for module in model.modules():  # non-trivial batch-norm statistics, so folding them is checked
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    path = folder / f"{name}{'_full' if full_size else ''}_b{batch or 'N'}.onnx"
    x = torch.randn(batch or 1, 3, side, side)
    dynamic = None if batch else {"x": {0: "batch"}, "y": {0: "batch"}}
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamic_axes=dynamic, dynamo=False)
    return path, side
