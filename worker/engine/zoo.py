"""Named image architectures whose state_dict keys, shapes and order are those of torchvision's
(ResNet-18/34/50, VGG-16-BN, MobileNetV2) and of chenyaofo/pytorch-cifar-models' CIFAR ResNets
(ResNet-20/56), so a user's `safetensors.torch.save_model(model, path)` of one of those models
loads here as is.

Written in-repo after torchvision's module structure (torchvision is not a dependency): the same
submodules are registered in the same order under the same attribute names, with the same default
initialisation. Block counts, widths, strides and settings are read from `arch.tables`, the tables
`arch`'s expected layouts are walked from.
"""

from __future__ import annotations

import torch
from torch import nn

from arch.tables import (
    TABLES,
    InvertedResidualPlan,
    MobileNetV2Table,
    ResNetBlockPlan,
    ResNetTable,
    VGGTable,
)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _downsample(plan: ResNetBlockPlan) -> nn.Module | None:
    if not plan.downsample:
        return None
    return nn.Sequential(conv1x1(plan.inplanes, plan.out_channels, plan.stride), nn.BatchNorm2d(plan.out_channels))


class BasicBlock(nn.Module):
    def __init__(self, plan: ResNetBlockPlan) -> None:
        super().__init__()
        self.conv1 = conv3x3(plan.inplanes, plan.planes, plan.stride)
        self.bn1 = nn.BatchNorm2d(plan.planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(plan.planes, plan.out_channels)
        self.bn2 = nn.BatchNorm2d(plan.out_channels)
        self.downsample = _downsample(plan)
        self.stride = plan.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3×3 conv."""

    def __init__(self, plan: ResNetBlockPlan) -> None:
        super().__init__()
        self.conv1 = conv1x1(plan.inplanes, plan.planes)
        self.bn1 = nn.BatchNorm2d(plan.planes)
        self.conv2 = conv3x3(plan.planes, plan.planes, plan.stride)
        self.bn2 = nn.BatchNorm2d(plan.planes)
        self.conv3 = conv1x1(plan.planes, plan.out_channels)
        self.bn3 = nn.BatchNorm2d(plan.out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(plan)
        self.stride = plan.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet (stem: conv 7×7/2, BN, ReLU, maxpool 3×3/2) or the CIFAR ResNet of
    chenyaofo/pytorch-cifar-models (stem: conv 3×3/1, BN, ReLU, no maxpool), as `table` gives it:
    stages layer1, layer2, … of residual blocks, adaptive average pool, `fc`."""

    def __init__(self, table: ResNetTable, num_classes: int, *, in_channels: int = 3) -> None:
        super().__init__()
        stem = table.stem
        self.conv1 = nn.Conv2d(
            in_channels,
            table.widths[0],
            kernel_size=stem.kernel,
            stride=stem.stride,
            padding=stem.kernel // 2,
            bias=False,
        )
        self.bn1 = nn.BatchNorm2d(table.widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem.maxpool else nn.Identity()
        block = Bottleneck if table.block == "bottleneck" else BasicBlock
        stages: dict[int, list[nn.Module]] = {}
        for plan in table.blocks():
            stages.setdefault(plan.stage, []).append(block(plan))
        for stage, blocks in stages.items():
            # layer1, layer2, …: registered in order, as torchvision's explicit attributes are.
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.stages = len(stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(table.out_channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(1, self.stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class VGG(nn.Module):
    """torchvision.models.VGG with `make_layers(table.config, batch_norm=True)`."""

    def __init__(self, table: VGGTable, num_classes: int, *, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for item in table.config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, item, kernel_size=3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                c_in = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((table.pool_size, table.pool_size))
        self.classifier = nn.Sequential(
            nn.Linear(table.out_channels * table.pool_size**2, table.hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(table.hidden, table.hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(table.hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation with BatchNorm2d and ReLU6: keys `.0.weight`, `.1.*`."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, plan: InvertedResidualPlan) -> None:
        super().__init__()
        self.stride = plan.stride
        self.use_res_connect = plan.stride == 1 and plan.in_channels == plan.out_channels
        layers: list[nn.Module] = []
        if plan.expand:
            layers.append(Conv2dNormActivation(plan.in_channels, plan.hidden, kernel_size=1))  # pw
        layers += [
            Conv2dNormActivation(plan.hidden, plan.hidden, stride=plan.stride, groups=plan.hidden),  # dw
            nn.Conv2d(plan.hidden, plan.out_channels, 1, 1, 0, bias=False),  # pw-linear
            nn.BatchNorm2d(plan.out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = plan.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision.models.MobileNetV2 at width multiplier 1.0, its blocks as `table` gives them."""

    def __init__(
        self, table: MobileNetV2Table, num_classes: int, *, in_channels: int = 3, dropout: float = 0.2
    ) -> None:
        super().__init__()
        features: list[nn.Module] = [Conv2dNormActivation(in_channels, table.stem, stride=2)]
        features += [InvertedResidual(plan) for plan in table.blocks()]
        features.append(Conv2dNormActivation(table.setting[-1][1], table.last, kernel_size=1))
        self.last_channel = table.last
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(table.last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def build_named(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The freshly initialised module of the named architecture `name` (a key of `arch.TABLES`)."""
    table = TABLES[name]
    if isinstance(table, ResNetTable):
        return ResNet(table, num_classes, in_channels=in_channels)
    if isinstance(table, VGGTable):
        return VGG(table, num_classes, in_channels=in_channels)
    return MobileNetV2(table, num_classes, in_channels=in_channels)
