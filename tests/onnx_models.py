"""Small networks of the kinds ONNX importers meet, exported with torch's own exporter (torch.onnx.export,
dynamo) inside the tests: a ResNet-style CNN (BatchNorm after a residual, strided 1×1 shortcut, max pooling), a
MobileNet-style CNN (depthwise and grouped convs, HardSwish, an SE block with HardSigmoid), a ViT-style classifier
(patch conv, class token, a transformer encoder layer with GELU, LayerNorm) and a tabular GELU + LayerNorm MLP.
All take 8×8 single-channel images or 64 features, the shapes of scikit-learn's digits."""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, 4, 1)
        self.fc2 = nn.Conv2d(4, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = x.mean((2, 3), keepdim=True)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(weights))))


class ResNetStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)  # after the residual sum: the exporter cannot fold it into a conv
        self.shortcut = nn.Conv2d(8, 16, 1, stride=2)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(y + self.conv2(y)))
        y = F.relu(self.shortcut(y) + self.conv3(y))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.pool(y), 1), 1))


class MobileNetStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 16, 1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(16)
        self.se = SqueezeExcite(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.stem(x))
        y = y + F.hardswish(self.depthwise(y))
        y = F.hardswish(self.bn(self.grouped(self.pointwise(y))))
        return self.fc(self.se(y).mean((2, 3)))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 5, dim) * 0.1)
        self.encoder = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True, activation="gelu")
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), patches], 1) + self.pos
        return self.head(self.norm(self.encoder(tokens)[:, 0]))


class TabularGelu(nn.Module):
    def __init__(self, features: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 32)
        self.out = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.norm(self.fc1(x)))
        h = h + F.gelu(self.fc2(h), approximate="tanh")
        return self.out(h)


MODELS = {
    "resnet_style": (ResNetStyle, (1, 8, 8)),
    "mobilenet_style": (MobileNetStyle, (1, 8, 8)),
    "vit_style": (TinyViT, (1, 8, 8)),
    "tabular_gelu": (TabularGelu, (64,)),
}


def seeded_model(name: str, seed: int = 0) -> nn.Module:
    """The model with seeded weights and non-trivial normalisation parameters and statistics (a fresh
    BatchNorm or LayerNorm is the identity, which would hide a wrong kernel)."""
    torch.manual_seed(seed)
    model = MODELS[name][0]().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def export(model: nn.Module, input_shape: tuple[int, ...], opset: int) -> bytes:
    """torch.onnx.export (dynamo) with a dynamic batch dimension, as one self-contained file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(),
            (torch.zeros(2, *input_shape),),
            None,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    assert program is not None
    return program.model_proto.SerializeToString()


@functools.cache
def exported(name: str, opset: int) -> bytes:
    """The seeded model `name` exported at `opset` (cached: exporting takes 1–3 s)."""
    return export(seeded_model(name), MODELS[name][1], opset)
