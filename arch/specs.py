"""The base architectures a model upload can name, as pydantic specs (JSON in, JSON out); the channel-pruned
spec over them and the registry are in `arch.registry`.

Pure Python + pydantic: the web process validates uploads with this module and never imports torch.
A spec's docstring is its description in GET /v1/architectures, and its examples are in its schema.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
)

# Strict ints: JSON `true` or "64" is a mistake in an architecture, not a width.
NumClasses = Annotated[StrictInt, Field(ge=2, le=100_000)]
HiddenWidth = Annotated[StrictInt, Field(ge=1, le=65_536)]
ConvChannels = Annotated[StrictInt, Field(ge=1, le=4_096)]


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


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
OpName = Annotated[str, Field(min_length=1, max_length=64)]
LayerPath = Annotated[str, Field(min_length=1, max_length=256)]


class OnnxReference(BaseModel):
    """How the imported module agreed with onnxruntime at upload: max |logit difference| and the tolerance."""

    model_config = ConfigDict(extra="forbid")

    max_abs_difference: float
    tolerance: float


class OnnxSpec(BaseModel):
    """An imported ONNX graph (upload the .onnx file with {"name": "onnx"}; the server reads the rest from the
    graph): the validated graph is stored as the blob `graph_sha256` and run with torch ops from an allow-list,
    its weights as safetensors under the graph's initializer names. Input shape and classes come from the graph
    (a dynamic batch dimension, the others fixed)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "onnx"}]},
    )

    name: Literal["onnx"]
    graph_sha256: Sha256
    input_shape: Annotated[list[Annotated[StrictInt, Field(ge=1, le=1_000_000)]], Field(min_length=1, max_length=7)]
    num_classes: NumClasses
    opset: Annotated[StrictInt, Field(ge=1, le=100)]
    ops: Annotated[list[OpName], Field(max_length=256)]
    parameter_count: Annotated[StrictInt, Field(ge=0)]
    prunable_layers: Annotated[list[LayerPath], Field(max_length=10_000)]
    reference: OnnxReference


class OnnxUpload(BaseModel):
    """An ONNX graph (.onnx, one self-contained file): upload it as `weights` with {"name": "onnx"} alone; input
    shape (a dynamic batch dimension, the others fixed) and classes are read from the graph, which is checked,
    converted to torch ops from an allow-list and compared with onnxruntime before it is stored (README: ONNX)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "onnx"}]})

    name: Literal["onnx"]
