"""What the torch module of a base spec holds, without torch: its layers and their state_dict names in order
with shapes and dtype kinds, and which pruned widths fit them (`arch.registry` applies this to any spec).

The named architectures' layouts are walked from `arch.tables`, the tables `worker.engine.zoo` builds
the modules from; the names are torchvision's (tests/unit/test_architectures.py checks the modules).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

from arch.mismatch import MISMATCHES_LISTED
from arch.specs import BaseSpec, CNNSpec, MLPSpec
from arch.tables import TABLES, MobileNetV2Table, ResNetTable, VGGTable

# "float" for parameters and float buffers, "int" for integer buffers such as num_batches_tracked.
DtypeKind = Literal["float", "int"]
StateDictLayout = dict[str, tuple[tuple[int, ...], DtypeKind]]
# Module name → its widths, under the names `worker.engine.architectures.layer_widths` reads them with.
LayerWidths = dict[str, dict[str, int]]


@dataclass(frozen=True)
class Layer:
    """A Conv2d, Linear or BatchNorm2d of a registry architecture: its widths, and what else fixes its
    tensors' shapes."""

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


class Layers(dict[str, Layer]):
    """The stateful layers of an architecture by module name, in registration order (which is the
    order of the module's state_dict)."""

    def linear(self, prefix: str, in_features: int, out_features: int) -> None:
        self[prefix] = Layer("linear", {"in_features": in_features, "out_features": out_features})

    def conv(self, prefix: str, c_in: int, c_out: int, kernel: int, *, groups: int = 1, bias: bool = False) -> None:
        self[prefix] = Layer("conv", {"in_channels": c_in, "out_channels": c_out, "groups": groups}, kernel, bias)

    def bn(self, prefix: str, channels: int) -> None:
        self[prefix] = Layer("bn", {"num_features": channels})

    def conv_bn_act(self, prefix: str, c_in: int, c_out: int, kernel: int, *, groups: int = 1) -> None:
        """torchvision's Conv2dNormActivation: Sequential(Conv2d without bias, BatchNorm2d, ReLU6)."""
        self.conv(f"{prefix}.0", c_in, c_out, kernel, groups=groups)
        self.bn(f"{prefix}.1", c_out)

    def layout(self, widths: Mapping[str, Mapping[str, int]] | None = None) -> StateDictLayout:
        layout: StateDictLayout = {}
        for prefix, layer in self.items():
            layout |= layer.tensors(prefix, (widths or {}).get(prefix))
        return layout


def _mlp_layers(spec: MLPSpec) -> Layers:
    widths = [spec.in_features, *spec.hidden, spec.num_classes]
    layers = Layers()
    # Linear layers sit at even indices of `layers`; the ReLUs between them hold no state.
    for i, (fan_in, fan_out) in enumerate(pairwise(widths)):
        layers.linear(f"layers.{2 * i}", fan_in, fan_out)
    return layers


def _cnn_layers(spec: CNNSpec) -> Layers:
    layers = Layers()
    # Each block is 4 modules (conv, bn, relu, pool); only conv and bn hold state.
    for i, (c_in, c_out) in enumerate(pairwise([spec.in_channels, *spec.channels])):
        layers.conv(f"features.{4 * i}", c_in, c_out, 3)
        layers.bn(f"features.{4 * i + 1}", c_out)
    layers.linear("classifier", spec.channels[-1], spec.num_classes)
    return layers


def _resnet_layers(table: ResNetTable, in_channels: int, num_classes: int) -> Layers:
    """Stem conv and BN, then each block's convs and BNs and its `downsample` (1×1 conv, BN), then `fc`."""
    layers = Layers()
    layers.conv("conv1", in_channels, table.widths[0], table.stem.kernel)
    layers.bn("bn1", table.widths[0])
    for block in table.blocks():
        prefix, planes, c_out = f"layer{block.stage}.{block.index}", block.planes, block.out_channels
        if table.block == "bottleneck":
            layers.conv(f"{prefix}.conv1", block.inplanes, planes, 1)
            layers.bn(f"{prefix}.bn1", planes)
            layers.conv(f"{prefix}.conv2", planes, planes, 3)
            layers.bn(f"{prefix}.bn2", planes)
            layers.conv(f"{prefix}.conv3", planes, c_out, 1)
            layers.bn(f"{prefix}.bn3", c_out)
        else:
            layers.conv(f"{prefix}.conv1", block.inplanes, planes, 3)
            layers.bn(f"{prefix}.bn1", planes)
            layers.conv(f"{prefix}.conv2", planes, planes, 3)
            layers.bn(f"{prefix}.bn2", planes)
        if block.downsample:
            layers.conv(f"{prefix}.downsample.0", block.inplanes, c_out, 1)
            layers.bn(f"{prefix}.downsample.1", c_out)
    layers.linear("fc", table.out_channels, num_classes)
    return layers


def _vgg_layers(table: VGGTable, in_channels: int, num_classes: int) -> Layers:
    """A conv at `features` index i has its BN at i + 1 (the ReLU at i + 2); a max pool takes one index.
    The classifier's Linears are at 0, 3 and 6 (ReLU, Dropout between)."""
    layers = Layers()
    index, c_in = 0, in_channels
    for item in table.config:
        if item == "M":
            index += 1
            continue
        layers.conv(f"features.{index}", c_in, item, 3, bias=True)
        layers.bn(f"features.{index + 1}", item)
        index, c_in = index + 3, item
    layers.linear("classifier.0", table.out_channels * table.pool_size**2, table.hidden)
    layers.linear("classifier.3", table.hidden, table.hidden)
    layers.linear("classifier.6", table.hidden, num_classes)
    return layers


def _mobilenet_v2_layers(table: MobileNetV2Table, in_channels: int, num_classes: int) -> Layers:
    """Each InvertedResidual is `conv` = [1×1 expand (absent when t = 1)], 3×3 depthwise, 1×1 project
    conv, BN; the classifier is Dropout, then Linear at `classifier.1`."""
    layers = Layers()
    layers.conv_bn_act("features.0", in_channels, table.stem, 3)
    for block in table.blocks():
        prefix, part = f"features.{block.index}.conv", 0
        if block.expand:
            layers.conv_bn_act(f"{prefix}.{part}", block.in_channels, block.hidden, 1)
            part += 1
        layers.conv_bn_act(f"{prefix}.{part}", block.hidden, block.hidden, 3, groups=block.hidden)
        layers.conv(f"{prefix}.{part + 1}", block.hidden, block.out_channels, 1)
        layers.bn(f"{prefix}.{part + 2}", block.out_channels)
    layers.conv_bn_act(f"features.{table.last_index}", table.setting[-1][1], table.last, 1)
    layers.linear("classifier.1", table.last, num_classes)
    return layers


def base_layers(spec: BaseSpec) -> Layers:
    """The stateful layers of a registry architecture that is not a pruned one."""
    if spec.name == "mlp":
        return _mlp_layers(spec)
    if spec.name == "cnn":
        return _cnn_layers(spec)
    table = TABLES.get(spec.name)
    if isinstance(table, ResNetTable):
        return _resnet_layers(table, spec.in_channels, spec.num_classes)
    if isinstance(table, VGGTable):
        return _vgg_layers(table, spec.in_channels, spec.num_classes)
    if isinstance(table, MobileNetV2Table):
        return _mobilenet_v2_layers(table, spec.in_channels, spec.num_classes)
    raise TypeError(f"no state-dict layout for architecture {spec.name!r}")


def pruned_widths(base_spec: BaseSpec, layers: Mapping[str, Mapping[str, int]]) -> LayerWidths:
    """Every layer of the base with the widths `spec` gives it (the base's where it gives none),
    checked the way `worker.engine.architectures.shrink_layers` checks them, as far as that goes
    without torch: known layer names, the right fields, widths from 1 up to the base's, groups that
    fit, each BatchNorm as wide as the conv before it, the input and the classes unchanged. (Whether
    the channels flow from layer to layer is left to the worker, which runs the rebuilt model once.)
    Raises ValueError with the reason."""
    base = base_layers(base_spec)
    arch = base_spec.name
    for name, given in layers.items():
        layer = base.get(name)
        if layer is None:
            known = ", ".join(list(base)[:MISMATCHES_LISTED])
            raise ValueError(
                f"layers: {name!r} is not a Conv, Linear or BatchNorm layer of {arch} "
                f"(its layers are named like {known}, …)"
            )
        _check_layer_widths(name, layer, given, arch)
    widths = {name: layer.widths | dict(layers.get(name, {})) for name, layer in base.items()}
    _check_layers_fit_together(base, widths)
    return widths


def _check_layer_widths(name: str, layer: Layer, given: Mapping[str, int], arch: str) -> None:
    if set(given) != set(layer.widths):
        raise ValueError(
            f"layers: {name} must give exactly {', '.join(sorted(layer.widths))}, "
            f"got {', '.join(sorted(given)) or 'nothing'}"
        )
    for field, value in given.items():
        if field != "groups" and value > layer.widths[field]:  # groups: checked below
            raise ValueError(
                f"layers: {name}.{field} is {value}, more than the {layer.widths[field]} of {arch}; "
                "pruning only removes channels"
            )
    if layer.kind != "conv":
        return
    groups, c_in, c_out = given["groups"], given["in_channels"], given["out_channels"]
    depthwise = layer.widths["groups"] > 1 and layer.widths["groups"] == layer.widths["in_channels"]
    if depthwise and not groups == c_in == c_out:
        raise ValueError(
            f"layers: {name} is a depthwise convolution, so groups, in_channels and "
            f"out_channels must be equal; got {groups}, {c_in} and {c_out}"
        )
    if not depthwise and groups != layer.widths["groups"]:
        raise ValueError(f"layers: {name} has groups {layer.widths['groups']} in {arch}, got {groups}")
    if c_in % groups or c_out % groups:
        raise ValueError(f"layers: groups {groups} of {name} do not divide {c_in} input and {c_out} output channels")


def _check_layers_fit_together(base: Layers, widths: LayerWidths) -> None:
    names = list(base)
    first, last = names[0], names[-1]
    input_field = "in_features" if base[first].kind == "linear" else "in_channels"
    if widths[first][input_field] != base[first].widths[input_field]:
        raise ValueError(
            f"layers: {first}.{input_field} must stay {base[first].widths[input_field]}: "
            "the input of the model cannot be pruned"
        )
    if widths[last]["out_features"] != base[last].widths["out_features"]:
        raise ValueError(
            f"layers: {last}.out_features must stay {base[last].widths['out_features']}: "
            "the classifier's outputs (num_classes) cannot be pruned"
        )
    for before, name in pairwise(names):
        if (
            base[name].kind == "bn"
            and base[before].kind == "conv"
            and widths[name]["num_features"] != widths[before]["out_channels"]
        ):
            raise ValueError(
                f"layers: {name}.num_features is {widths[name]['num_features']} but the convolution "
                f"before it, {before}, has {widths[before]['out_channels']} output channels"
            )
