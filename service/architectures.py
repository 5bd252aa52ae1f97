"""The registry of architectures a model upload can name, as JSON specs.

Pure Python + pydantic: the web process validates uploads with this module and must never import
torch or numpy. `worker.engine.architectures` builds the torch modules; the parameter names and
shapes below must match those modules exactly (tests/unit/test_architectures.py checks it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictInt,
    StringConstraints,
    TypeAdapter,
    ValidatorFunctionWrapHandler,
    model_serializer,
    model_validator,
)

# "float" for parameters and float buffers, "int" for integer buffers such as num_batches_tracked.
DtypeKind = Literal["float", "int"]
StateDictLayout = dict[str, tuple[tuple[int, ...], DtypeKind]]

# Strict ints: JSON `true` or "64" is a mistake in an architecture, not a width.
NumClasses = Annotated[StrictInt, Field(ge=2, le=100_000)]
HiddenWidth = Annotated[StrictInt, Field(ge=1, le=65_536)]
ConvChannels = Annotated[StrictInt, Field(ge=1, le=4_096)]

MISMATCHES_LISTED = 5


class MLPSpec(BaseModel):
    """Fully connected network: Linear → ReLU → … → Linear. Inputs are flattened first, so
    [N, 1, 8, 8] data fits in_features=64."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "mlp", "in_features": 64, "hidden": [128, 64], "num_classes": 10},
                {"name": "mlp", "in_features": 30, "hidden": [], "num_classes": 2},
            ]
        },
    )

    name: Literal["mlp"]
    in_features: Annotated[StrictInt, Field(ge=1, le=1_000_000)]
    hidden: Annotated[list[HiddenWidth], Field(max_length=16)]
    num_classes: NumClasses


class CNNSpec(BaseModel):
    """Blocks of Conv3x3 (no bias) → BatchNorm → ReLU → MaxPool2 (Identity once the feature map is
    1×1), then global average pooling and one Linear classifier. Square images only."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "cnn", "in_channels": 3, "image_size": 32, "channels": [32, 64, 128], "num_classes": 10},
                {"name": "cnn", "in_channels": 1, "image_size": 8, "channels": [16, 32], "num_classes": 10},
            ]
        },
    )

    name: Literal["cnn"]
    in_channels: Annotated[StrictInt, Field(ge=1, le=64)]
    image_size: Annotated[StrictInt, Field(ge=4, le=1024)]
    channels: Annotated[list[ConvChannels], Field(min_length=1, max_length=8)]
    num_classes: NumClasses


ImageSize = Annotated[StrictInt, Field(ge=32, le=1024)]
CifarImageSize = Annotated[StrictInt, Field(ge=8, le=1024)]


class _ImageNetSpec(BaseModel):
    """Shared fields of the torchvision architectures: 3-channel square images, any size from 32
    (the network ends in adaptive pooling), a classifier head of `num_classes` outputs."""

    model_config = ConfigDict(extra="forbid")

    name: str  # narrowed to a Literal by each subclass; declared here so it comes first in dumps
    num_classes: NumClasses = 1000
    in_channels: Literal[3] = 3
    image_size: ImageSize = 224


class ResNet18Spec(_ImageNetSpec):
    """torchvision ResNet-18 (BasicBlock, [2, 2, 2, 2]); state-dict keys and shapes are those of
    `torchvision.models.resnet18(num_classes=...)`, so its safetensors file uploads as is."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"name": "resnet18"}, {"name": "resnet18", "num_classes": 10, "image_size": 64}]
        }
    )
    name: Literal["resnet18"]


class ResNet34Spec(_ImageNetSpec):
    """torchvision ResNet-34 (BasicBlock, [3, 4, 6, 3]); keys and shapes as
    `torchvision.models.resnet34(num_classes=...)`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"name": "resnet34"}, {"name": "resnet34", "num_classes": 100, "image_size": 64}]
        }
    )
    name: Literal["resnet34"]


class ResNet50Spec(_ImageNetSpec):
    """torchvision ResNet-50 (Bottleneck with the stride on the 3×3 conv, [3, 4, 6, 3]); keys and
    shapes as `torchvision.models.resnet50(num_classes=...)`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"name": "resnet50"}, {"name": "resnet50", "num_classes": 10, "image_size": 96}]
        }
    )
    name: Literal["resnet50"]


class VGG16BNSpec(_ImageNetSpec):
    """torchvision VGG-16 with BatchNorm (config D, AdaptiveAvgPool2d to 7×7, 4096-4096 classifier);
    keys and shapes as `torchvision.models.vgg16_bn(num_classes=...)`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"name": "vgg16_bn"}, {"name": "vgg16_bn", "num_classes": 10, "image_size": 32}]
        }
    )
    name: Literal["vgg16_bn"]


class MobileNetV2Spec(_ImageNetSpec):
    """torchvision MobileNetV2 (width 1.0: inverted residuals, last 1×1 conv to 1280 channels,
    `classifier.1` Linear); keys and shapes as `torchvision.models.mobilenet_v2(num_classes=...)`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"name": "mobilenet_v2"}, {"name": "mobilenet_v2", "num_classes": 10, "image_size": 96}]
        }
    )
    name: Literal["mobilenet_v2"]


class _CifarResNetSpec(BaseModel):
    """Shared fields of the CIFAR ResNets: 3-channel square images (32×32 for CIFAR), adaptive
    average pooling before `fc`."""

    model_config = ConfigDict(extra="forbid")

    name: str  # narrowed to a Literal by each subclass
    num_classes: NumClasses = 10
    in_channels: Literal[3] = 3
    image_size: CifarImageSize = 32


class ResNet20Spec(_CifarResNetSpec):
    """CIFAR ResNet-20 (He et al. 2016: 3×3 stem, 3 stages of 3 BasicBlocks at 16/32/64 channels,
    1×1 conv + BN `downsample` shortcuts). Keys and shapes as chenyaofo/pytorch-cifar-models
    `cifar10_resnet20` / `cifar100_resnet20` (num_classes 10 / 100)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"name": "resnet20"}, {"name": "resnet20", "num_classes": 100}]}
    )
    name: Literal["resnet20"]


class ResNet56Spec(_CifarResNetSpec):
    """CIFAR ResNet-56 (He et al. 2016: 3 stages of 9 BasicBlocks at 16/32/64 channels, 1×1 conv +
    BN `downsample` shortcuts). Keys and shapes as chenyaofo/pytorch-cifar-models
    `cifar10_resnet56` / `cifar100_resnet56` (num_classes 10 / 100)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"name": "resnet56"}, {"name": "resnet56", "num_classes": 100}]}
    )
    name: Literal["resnet56"]


ImageNetSpec = ResNet18Spec | ResNet34Spec | ResNet50Spec | VGG16BNSpec | MobileNetV2Spec
CifarResNetSpec = ResNet20Spec | ResNet56Spec
# Every spec but the MLP has in_channels and image_size: it takes [in_channels, image_size, image_size].
BaseSpec = MLPSpec | CNNSpec | ImageNetSpec | CifarResNetSpec
BaseArchitectureSpec = Annotated[BaseSpec, Field(discriminator="name")]

MAX_PRUNED_LAYERS = 1_024
LayerName = Annotated[str, StringConstraints(min_length=1, max_length=256)]
LayerWidths = Annotated[
    dict[Annotated[str, StringConstraints(max_length=32)], Annotated[StrictInt, Field(ge=1, le=1_000_000)]],
    Field(max_length=3),
]
# What a pruned spec's dump repeats from its base (so readers of a stored spec find them where they
# find them on the base); validation accepts them back only when they agree with the base.
_FROM_BASE = ("num_classes", "in_features", "in_channels", "image_size")


class PrunedSpec(BaseModel):
    """A channel-pruned registry architecture, as written in a pruneaudit run recipe: `base` is the
    architecture it was pruned from, and `layers` gives the pruned Conv ({in_channels, out_channels,
    groups}), Linear ({in_features, out_features}) and BatchNorm ({num_features}) layers by module
    name; each width at most the base's. Unlisted layers keep the base's widths. The classifier's
    outputs and the first layer's inputs cannot be pruned."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "pruned",
                    "version": 1,
                    "base": {"name": "cnn", "in_channels": 1, "image_size": 8, "channels": [16, 32], "num_classes": 10},
                    "layers": {
                        "features.0": {"in_channels": 1, "out_channels": 8, "groups": 1},
                        "features.1": {"num_features": 8},
                        "features.4": {"in_channels": 8, "out_channels": 16, "groups": 1},
                        "features.5": {"num_features": 16},
                        "classifier": {"in_features": 16, "out_features": 10},
                    },
                }
            ]
        },
    )

    name: Literal["pruned"]
    version: Literal[1]
    base: BaseArchitectureSpec
    layers: Annotated[dict[LayerName, LayerWidths], Field(max_length=MAX_PRUNED_LAYERS)]

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    # AttributeError where the base has no such field, so hasattr() and getattr(spec, key, default) work.
    @property
    def in_features(self) -> int:
        if isinstance(self.base, MLPSpec):
            return self.base.in_features
        raise AttributeError(f"a pruned {self.base.name} has no in_features")

    @property
    def in_channels(self) -> int:
        if not isinstance(self.base, MLPSpec):
            return self.base.in_channels
        raise AttributeError("a pruned mlp has no in_channels")

    @property
    def image_size(self) -> int:
        if not isinstance(self.base, MLPSpec):
            return self.base.image_size
        raise AttributeError("a pruned mlp has no image_size")

    def base_fields(self) -> dict[str, int]:
        """num_classes and the input fields of the base (in_features, or in_channels and image_size)."""
        return {key: getattr(self, key) for key in _FROM_BASE if hasattr(self, key)}

    @model_validator(mode="wrap")
    @classmethod
    def _accept_base_fields(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> PrunedSpec:
        """A dump (with the base's fields repeated) validates back to the same spec."""
        repeated: dict[str, Any] = {}
        if isinstance(data, dict):
            repeated = {key: data[key] for key in _FROM_BASE if key in data}
            data = {key: value for key, value in data.items() if key not in _FROM_BASE}
        spec = handler(data)
        fields = spec.base_fields()
        for key, value in repeated.items():
            if key not in fields:
                raise ValueError(f"{key} is not a field of a pruned {spec.base.name} architecture")
            if type(value) is not int or value != fields[key]:
                raise ValueError(f"{key} is {value!r} but the base architecture has {fields[key]}")
        return spec

    @model_validator(mode="after")
    def _check_layers(self) -> PrunedSpec:
        _pruned_layers(self)  # raises ValueError with the reason
        return self

    @model_serializer(mode="wrap")
    def _dump_with_base_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {**handler(self), **self.base_fields()}


AnySpec = BaseSpec | PrunedSpec

ArchitectureSpec = Annotated[AnySpec, Field(discriminator="name")]
architecture_adapter: TypeAdapter[AnySpec] = TypeAdapter(ArchitectureSpec)

REGISTRY: dict[str, type[BaseModel]] = {
    "mlp": MLPSpec,
    "cnn": CNNSpec,
    "resnet18": ResNet18Spec,
    "resnet34": ResNet34Spec,
    "resnet50": ResNet50Spec,
    "vgg16_bn": VGG16BNSpec,
    "mobilenet_v2": MobileNetV2Spec,
    "resnet20": ResNet20Spec,
    "resnet56": ResNet56Spec,
    "pruned": PrunedSpec,
}


@dataclass(frozen=True)
class _Layer:
    """A Conv2d, Linear or BatchNorm2d of a registry architecture: its widths under the names
    `worker.engine.structured` records them with, and what else fixes its tensors' shapes."""

    kind: Literal["conv", "linear", "bn"]
    widths: dict[str, int]
    kernel: int = 0
    bias: bool = False

    def tensors(self, prefix: str, widths: Mapping[str, int] | None = None) -> StateDictLayout:
        """The layer's state_dict entries in Module.state_dict() order (parameters, then buffers)."""
        w = self.widths if widths is None else widths
        if self.kind == "conv":
            c_out = w["out_channels"]
            layout: StateDictLayout = {
                f"{prefix}.weight": ((c_out, w["in_channels"] // w["groups"], self.kernel, self.kernel), "float")
            }
            if self.bias:
                layout[f"{prefix}.bias"] = ((c_out,), "float")
            return layout
        if self.kind == "linear":
            return {
                f"{prefix}.weight": ((w["out_features"], w["in_features"]), "float"),
                f"{prefix}.bias": ((w["out_features"],), "float"),
            }
        n = w["num_features"]
        return {
            f"{prefix}.weight": ((n,), "float"),
            f"{prefix}.bias": ((n,), "float"),
            f"{prefix}.running_mean": ((n,), "float"),
            f"{prefix}.running_var": ((n,), "float"),
            f"{prefix}.num_batches_tracked": ((), "int"),
        }


class _Layers(dict[str, _Layer]):
    """The stateful layers of an architecture by module name, in registration order (which is the
    order of the module's state_dict)."""

    def linear(self, prefix: str, in_features: int, out_features: int) -> None:
        self[prefix] = _Layer("linear", {"in_features": in_features, "out_features": out_features})

    def conv(self, prefix: str, c_in: int, c_out: int, kernel: int, *, groups: int = 1, bias: bool = False) -> None:
        self[prefix] = _Layer("conv", {"in_channels": c_in, "out_channels": c_out, "groups": groups}, kernel, bias)

    def bn(self, prefix: str, channels: int) -> None:
        self[prefix] = _Layer("bn", {"num_features": channels})

    def conv_bn_act(self, prefix: str, c_in: int, c_out: int, kernel: int, *, groups: int = 1) -> None:
        """torchvision's Conv2dNormActivation: Sequential(Conv2d without bias, BatchNorm2d, ReLU6)."""
        self.conv(f"{prefix}.0", c_in, c_out, kernel, groups=groups)
        self.bn(f"{prefix}.1", c_out)

    def layout(self, widths: Mapping[str, Mapping[str, int]] | None = None) -> StateDictLayout:
        layout: StateDictLayout = {}
        for prefix, layer in self.items():
            layout |= layer.tensors(prefix, (widths or {}).get(prefix))
        return layout


def _mlp_layers(spec: MLPSpec) -> _Layers:
    widths = [spec.in_features, *spec.hidden, spec.num_classes]
    layers = _Layers()
    # Linear layers sit at even indices of `layers`; the ReLUs between them hold no state.
    for i, (fan_in, fan_out) in enumerate(pairwise(widths)):
        layers.linear(f"layers.{2 * i}", fan_in, fan_out)
    return layers


def _cnn_layers(spec: CNNSpec) -> _Layers:
    layers = _Layers()
    # Each block is 4 modules (conv, bn, relu, pool); only conv and bn hold state.
    for i, (c_in, c_out) in enumerate(pairwise([spec.in_channels, *spec.channels])):
        layers.conv(f"features.{4 * i}", c_in, c_out, 3)
        layers.bn(f"features.{4 * i + 1}", c_out)
    layers.linear("classifier", spec.channels[-1], spec.num_classes)
    return layers


ResNetBlock = Literal["basic", "bottleneck"]
ResNetStem = Literal["imagenet", "cifar"]
# name → (block, blocks per stage, stage widths, stem). Every stage after the first starts with stride 2.
RESNET_CONFIGS: dict[str, tuple[ResNetBlock, tuple[int, ...], tuple[int, ...], ResNetStem]] = {
    "resnet18": ("basic", (2, 2, 2, 2), (64, 128, 256, 512), "imagenet"),
    "resnet34": ("basic", (3, 4, 6, 3), (64, 128, 256, 512), "imagenet"),
    "resnet50": ("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), "imagenet"),
    "resnet20": ("basic", (3, 3, 3), (16, 32, 64), "cifar"),
    "resnet56": ("basic", (9, 9, 9), (16, 32, 64), "cifar"),
}


def _resnet_layers(name: str, in_channels: int, num_classes: int) -> _Layers:
    """torchvision's ResNet (stem conv 7×7/2 + maxpool) or the CIFAR ResNet of
    chenyaofo/pytorch-cifar-models (stem conv 3×3/1): `_make_layer` adds a 1×1 conv + BN
    `downsample` to a stage's first block when the stride or the width changes."""
    block, depths, widths, stem = RESNET_CONFIGS[name]
    expansion = 4 if block == "bottleneck" else 1
    inplanes = widths[0]
    layers = _Layers()
    layers.conv("conv1", in_channels, inplanes, 7 if stem == "imagenet" else 3)
    layers.bn("bn1", inplanes)
    for stage, (planes, depth) in enumerate(zip(widths, depths, strict=True), start=1):
        stride = 1 if stage == 1 else 2
        for index in range(depth):
            prefix = f"layer{stage}.{index}"
            if block == "bottleneck":
                layers.conv(f"{prefix}.conv1", inplanes, planes, 1)
                layers.bn(f"{prefix}.bn1", planes)
                layers.conv(f"{prefix}.conv2", planes, planes, 3)
                layers.bn(f"{prefix}.bn2", planes)
                layers.conv(f"{prefix}.conv3", planes, planes * expansion, 1)
                layers.bn(f"{prefix}.bn3", planes * expansion)
            else:
                layers.conv(f"{prefix}.conv1", inplanes, planes, 3)
                layers.bn(f"{prefix}.bn1", planes)
                layers.conv(f"{prefix}.conv2", planes, planes, 3)
                layers.bn(f"{prefix}.bn2", planes)
            if index == 0 and (stride != 1 or inplanes != planes * expansion):
                layers.conv(f"{prefix}.downsample.0", inplanes, planes * expansion, 1)
                layers.bn(f"{prefix}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    layers.linear("fc", inplanes, num_classes)
    return layers


# torchvision's cfgs["D"]: output channels of each 3×3 conv, "M" for a 2×2 max pool.
VGG16_CONFIG: tuple[int | Literal["M"], ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


def _vgg16_bn_layers(in_channels: int, num_classes: int) -> _Layers:
    """`features` is conv (with bias), BN, ReLU per conv and one MaxPool per "M", so a conv at
    index i has its BN at i + 1; the classifier's Linears are at 0, 3 and 6 (ReLU, Dropout between)."""
    layers = _Layers()
    index, c_in = 0, in_channels
    for item in VGG16_CONFIG:
        if item == "M":
            index += 1
            continue
        layers.conv(f"features.{index}", c_in, item, 3, bias=True)
        layers.bn(f"features.{index + 1}", item)
        index, c_in = index + 3, item
    layers.linear("classifier.0", 512 * 7 * 7, 4096)
    layers.linear("classifier.3", 4096, 4096)
    layers.linear("classifier.6", 4096, num_classes)
    return layers


# torchvision's inverted_residual_setting: expansion t, output channels c, repeats n, stride s.
MOBILENET_V2_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
MOBILENET_V2_STEM, MOBILENET_V2_LAST = 32, 1280


def _mobilenet_v2_layers(in_channels: int, num_classes: int) -> _Layers:
    """Width multiplier 1.0 (every channel count is already a multiple of 8). Each InvertedResidual
    is `conv` = [1×1 expand (absent when t = 1)], 3×3 depthwise, 1×1 project conv, BN."""
    layers = _Layers()
    layers.conv_bn_act("features.0", in_channels, MOBILENET_V2_STEM, 3)
    index, c_in = 1, MOBILENET_V2_STEM
    for t, c, n, _s in MOBILENET_V2_SETTING:
        for _ in range(n):
            hidden = int(round(c_in * t))
            prefix, part = f"features.{index}.conv", 0
            if t != 1:
                layers.conv_bn_act(f"{prefix}.{part}", c_in, hidden, 1)
                part += 1
            layers.conv_bn_act(f"{prefix}.{part}", hidden, hidden, 3, groups=hidden)
            layers.conv(f"{prefix}.{part + 1}", hidden, c, 1)
            layers.bn(f"{prefix}.{part + 2}", c)
            index, c_in = index + 1, c
    layers.conv_bn_act(f"features.{index}", c_in, MOBILENET_V2_LAST, 1)
    layers.linear("classifier.1", MOBILENET_V2_LAST, num_classes)
    return layers


def _base_layers(spec: BaseSpec) -> _Layers:
    if isinstance(spec, MLPSpec):
        return _mlp_layers(spec)
    if isinstance(spec, CNNSpec):
        return _cnn_layers(spec)
    if spec.name in RESNET_CONFIGS:
        return _resnet_layers(spec.name, spec.in_channels, spec.num_classes)
    if isinstance(spec, VGG16BNSpec):
        return _vgg16_bn_layers(spec.in_channels, spec.num_classes)
    if isinstance(spec, MobileNetV2Spec):
        return _mobilenet_v2_layers(spec.in_channels, spec.num_classes)
    raise TypeError(f"no state-dict layout for architecture {spec.name!r}")


def _pruned_layers(spec: PrunedSpec) -> tuple[_Layers, dict[str, dict[str, int]]]:
    """The base's layers and the widths `spec` gives them, checked the way
    `worker.engine.structured.rebuild_structured` checks them, as far as that goes without torch:
    known layer names, the right fields, widths from 1 up to the base's, groups that fit, each
    BatchNorm as wide as the conv before it, the input and the classes unchanged. (Whether the
    channels flow from layer to layer is left to the worker, which runs the rebuilt model once.)
    Raises ValueError with the reason."""
    base = _base_layers(spec.base)
    arch = spec.base.name
    for name, given in spec.layers.items():
        layer = base.get(name)
        if layer is None:
            known = ", ".join(list(base)[:MISMATCHES_LISTED])
            raise ValueError(f"layers: {name!r} is not a Conv, Linear or BatchNorm layer of {arch} "
                             f"(its layers are named like {known}, …)")
        if set(given) != set(layer.widths):
            raise ValueError(f"layers: {name} must give exactly {', '.join(sorted(layer.widths))}, "
                             f"got {', '.join(sorted(given)) or 'nothing'}")
        for field, value in given.items():
            if field != "groups" and value > layer.widths[field]:  # groups: checked below
                raise ValueError(f"layers: {name}.{field} is {value}, more than the {layer.widths[field]} of {arch}; "
                                 "pruning only removes channels")
        if layer.kind == "conv":
            groups, c_in, c_out = given["groups"], given["in_channels"], given["out_channels"]
            depthwise = layer.widths["groups"] > 1 and layer.widths["groups"] == layer.widths["in_channels"]
            if depthwise and not groups == c_in == c_out:
                raise ValueError(f"layers: {name} is a depthwise convolution, so groups, in_channels and "
                                 f"out_channels must be equal; got {groups}, {c_in} and {c_out}")
            if not depthwise and groups != layer.widths["groups"]:
                raise ValueError(f"layers: {name} has groups {layer.widths['groups']} in {arch}, got {groups}")
            if c_in % groups or c_out % groups:
                raise ValueError(f"layers: groups {groups} of {name} do not divide {c_in} input and {c_out} "
                                 "output channels")
    widths = {name: layer.widths | spec.layers.get(name, {}) for name, layer in base.items()}
    names = list(base)
    first, last = names[0], names[-1]
    input_field = "in_features" if base[first].kind == "linear" else "in_channels"
    if widths[first][input_field] != base[first].widths[input_field]:
        raise ValueError(f"layers: {first}.{input_field} must stay {base[first].widths[input_field]}: "
                         "the input of the model cannot be pruned")
    if widths[last]["out_features"] != base[last].widths["out_features"]:
        raise ValueError(f"layers: {last}.out_features must stay {base[last].widths['out_features']}: "
                         "the classifier's outputs (num_classes) cannot be pruned")
    for before, name in pairwise(names):
        if base[name].kind == "bn" and base[before].kind == "conv" \
                and widths[name]["num_features"] != widths[before]["out_channels"]:
            raise ValueError(f"layers: {name}.num_features is {widths[name]['num_features']} but the convolution "
                             f"before it, {before}, has {widths[before]['out_channels']} output channels")
    return base, widths


def expected_state_dict(spec: AnySpec) -> StateDictLayout:
    """Names of the torch module's state_dict() in order (parameters and buffers), each mapped to
    (shape, dtype kind). A pruned spec has its base's names with the pruned layers' shapes."""
    if isinstance(spec, PrunedSpec):
        base, widths = _pruned_layers(spec)
        return base.layout(widths)
    return _base_layers(spec).layout()


def input_shape(spec: AnySpec) -> list[int]:
    """Shape of one input example, without the batch dimension (a pruned model takes its base's)."""
    if isinstance(spec, PrunedSpec):
        return input_shape(spec.base)
    if isinstance(spec, MLPSpec):
        return [spec.in_features]
    return [spec.in_channels, spec.image_size, spec.image_size]


def parameter_count(spec: AnySpec) -> int:
    """Trainable parameters (weights, biases, BatchNorm affine); buffers are not counted."""
    buffers = {"running_mean", "running_var", "num_batches_tracked"}
    return sum(
        math.prod(shape)
        for name, (shape, _) in expected_state_dict(spec).items()
        if name.rsplit(".", 1)[-1] not in buffers
    )


@dataclass(frozen=True)
class WeightsMismatch:
    """Why a weights file does not fit an architecture: one sentence for people, and one entry per
    key for programs ({"key", "problem": "missing" | "unexpected" | "shape_mismatch" |
    "kind_mismatch", ...})."""

    message: str
    errors: list[dict]


def state_dict_mismatch(
    architecture: str,
    expected: Mapping[str, tuple[Sequence[int], str]],
    found: Mapping[str, tuple[Sequence[int], str]],
) -> WeightsMismatch | None:
    """What keeps `found` (a weights file's names → (shape, dtype kind)) from loading into
    `expected`, or None when it fits. Pure, so the web process checks a safetensors header at upload
    time with the same words the worker uses when it loads the tensors."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    shape_bad = [key for key in expected if key in found and list(found[key][0]) != list(expected[key][0])]
    kind_bad = [key for key in expected if key in found and found[key][1] != expected[key][1]]
    if not (missing or unexpected or shape_bad or kind_bad):
        return None

    parts: list[str] = []
    if missing:
        parts.append(f"{_keys_are(len(missing))} missing from the file: {_listing(missing)}")
    if unexpected:
        parts.append(f"{_keys_are(len(unexpected))} not part of the architecture: {_listing(unexpected)}")
    parts += [
        f"{key} has shape {_shape(found[key][0])}, the architecture expects {_shape(expected[key][0])}"
        for key in shape_bad[:MISMATCHES_LISTED]
    ]
    if len(shape_bad) > MISMATCHES_LISTED:
        parts.append(f"and {len(shape_bad) - MISMATCHES_LISTED} more shape mismatches")
    parts += [
        f"{key} is {_a(found[key][1])} tensor, the architecture expects {_a(expected[key][1])} tensor"
        for key in kind_bad[:MISMATCHES_LISTED]
    ]
    if len(kind_bad) > MISMATCHES_LISTED:
        parts.append(f"and {len(kind_bad) - MISMATCHES_LISTED} more dtype mismatches")
    hint = _prefix_hint(missing, unexpected)
    if hint:
        parts.append(hint)

    errors: list[dict] = [
        {"key": key, "problem": "missing", "expected_shape": list(expected[key][0]), "expected_kind": expected[key][1]}
        for key in missing
    ]
    errors += [
        {"key": key, "problem": "unexpected", "shape": list(found[key][0]), "kind": found[key][1]}
        for key in unexpected
    ]
    errors += [
        {
            "key": key,
            "problem": "shape_mismatch",
            "shape": list(found[key][0]),
            "expected_shape": list(expected[key][0]),
        }
        for key in shape_bad
    ]
    errors += [
        {"key": key, "problem": "kind_mismatch", "kind": found[key][1], "expected_kind": expected[key][1]}
        for key in kind_bad
    ]
    return WeightsMismatch(f"weights do not fit architecture {architecture}: " + "; ".join(parts), errors)


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str | None:
    """If the file's keys are the architecture's keys with an extra (or absent) leading component,
    such as DataParallel's "module.", say so."""

    def probe(longer: list[str], shorter: list[str]) -> str | None:
        if not longer or not shorter:
            return None
        prefix = longer[0].split(".", 1)[0] + "."
        stripped = {key[len(prefix):] for key in longer if key.startswith(prefix)}
        if len(stripped) == len(longer) and set(shorter) <= stripped:
            return prefix
        return None

    prefix = probe(unexpected, missing)
    if prefix:
        return (
            f"every key in the file starts with {prefix!r} (a wrapper such as DataParallel?): save the "
            f"inner model's state_dict, or strip the {prefix!r} prefix from the keys"
        )
    prefix = probe(missing, unexpected)
    if prefix:
        return (
            f"the architecture's keys start with {prefix!r} but the file's do not: add the {prefix!r} "
            "prefix to the keys, or pick the architecture that matches the saved module"
        )
    return None


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _keys_are(n: int) -> str:
    return f"{n} key is" if n == 1 else f"{n} keys are"


def _listing(keys: list[str]) -> str:
    more = len(keys) - MISMATCHES_LISTED
    return ", ".join(keys[:MISMATCHES_LISTED]) + (f" and {more} more" if more > 0 else "")
