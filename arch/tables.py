"""The configuration tables of the named architectures, the one copy of them: the expected state-dict
layouts (`arch.layers`) and the torch modules (`worker.engine.zoo`) are both built by walking these.

The values are torchvision's (ResNet-18/34/50, VGG-16-BN, MobileNetV2 at width 1.0) and those of
chenyaofo/pytorch-cifar-models (ResNet-20/56), so their state dicts load here as is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ResNetStem:
    """The first conv (no bias, padding kernel // 2), its BN and ReLU, then a 3×3/2 max pool or none."""

    kernel: int
    stride: int
    maxpool: bool


IMAGENET_STEM = ResNetStem(kernel=7, stride=2, maxpool=True)
CIFAR_STEM = ResNetStem(kernel=3, stride=1, maxpool=False)


@dataclass(frozen=True)
class ResNetBlockPlan:
    """One residual block, as torchvision's `ResNet._make_layer` creates it: registered as
    `layer{stage}.{index}`, `inplanes` channels in, `planes` inside, `out_channels` (planes × the
    block's expansion) out."""

    stage: int  # from 1
    index: int
    inplanes: int
    planes: int
    out_channels: int
    stride: int
    downsample: bool  # a 1×1 conv + BN shortcut, where the stride or the width changes


@dataclass(frozen=True)
class ResNetTable:
    """`block` "basic" (two 3×3 convs) or "bottleneck" (1×1, 3×3 carrying the stride, 1×1 to 4× planes:
    torchvision's v1.5); `depths` blocks per stage at `widths` planes; every stage after the first
    starts with stride 2."""

    block: Literal["basic", "bottleneck"]
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    stem: ResNetStem

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    @property
    def out_channels(self) -> int:
        """The channels the last stage gives the `fc` classifier."""
        return self.widths[-1] * self.expansion

    def blocks(self) -> Iterator[ResNetBlockPlan]:
        inplanes = self.widths[0]
        for stage, (planes, depth) in enumerate(zip(self.widths, self.depths, strict=True), start=1):
            for index in range(depth):
                stride = 2 if stage > 1 and index == 0 else 1
                out_channels = planes * self.expansion
                downsample = index == 0 and (stride != 1 or inplanes != out_channels)
                yield ResNetBlockPlan(stage, index, inplanes, planes, out_channels, stride, downsample)
                inplanes = out_channels


RESNETS: dict[str, ResNetTable] = {
    "resnet18": ResNetTable("basic", (2, 2, 2, 2), (64, 128, 256, 512), IMAGENET_STEM),
    "resnet34": ResNetTable("basic", (3, 4, 6, 3), (64, 128, 256, 512), IMAGENET_STEM),
    "resnet50": ResNetTable("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), IMAGENET_STEM),
    "resnet20": ResNetTable("basic", (3, 3, 3), (16, 32, 64), CIFAR_STEM),
    "resnet56": ResNetTable("basic", (9, 9, 9), (16, 32, 64), CIFAR_STEM),
}


@dataclass(frozen=True)
class VGGTable:
    """torchvision's VGG with `make_layers(config, batch_norm=True)`: `features` holds a 3×3 conv (with
    bias), BN and ReLU per number in `config` and a 2×2 max pool per "M"; then adaptive average
    pooling to `pool_size`² and a classifier Linear → ReLU → Dropout → Linear → ReLU → Dropout → Linear
    through `hidden` units."""

    config: tuple[int | Literal["M"], ...]
    pool_size: int
    hidden: int

    @property
    def out_channels(self) -> int:
        return [item for item in self.config if item != "M"][-1]


# torchvision's cfgs["D"].
VGG16_BN = VGGTable(
    config=(64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    pool_size=7,
    hidden=4096,
)


@dataclass(frozen=True)
class InvertedResidualPlan:
    """One MobileNetV2 block, registered as `features.{index}`: an optional 1×1 expansion to `hidden`
    channels (absent when the expansion ratio is 1), a 3×3 depthwise conv carrying the stride, a 1×1
    projection to `out_channels`."""

    index: int
    in_channels: int
    out_channels: int
    hidden: int
    stride: int
    expand: bool


@dataclass(frozen=True)
class MobileNetV2Table:
    """`setting` is torchvision's inverted_residual_setting: expansion t, output channels c, repeats n,
    stride s (of the first repeat). `stem` is the first conv's width, `last` the final 1×1 conv's.
    Width multiplier 1.0: every channel count is already a multiple of 8, so none is rounded."""

    stem: int
    setting: tuple[tuple[int, int, int, int], ...]
    last: int

    def blocks(self) -> Iterator[InvertedResidualPlan]:
        index, c_in = 1, self.stem
        for t, c, n, s in self.setting:
            for repeat in range(n):
                yield InvertedResidualPlan(index, c_in, c, c_in * t, s if repeat == 0 else 1, t != 1)
                index, c_in = index + 1, c

    @property
    def last_index(self) -> int:
        """The index in `features` of the final 1×1 conv, after the stem and every block."""
        return 1 + sum(n for _t, _c, n, _s in self.setting)


MOBILENET_V2 = MobileNetV2Table(
    stem=32,
    setting=(
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ),
    last=1280,
)

# Every named registry architecture (the specs in `arch.specs` with no size fields of their own).
TABLES: dict[str, ResNetTable | VGGTable | MobileNetV2Table] = {
    **RESNETS,
    "vgg16_bn": VGG16_BN,
    "mobilenet_v2": MOBILENET_V2,
}
