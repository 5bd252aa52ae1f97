"""Every architecture a model upload can name: the base specs (`arch.specs`) and the channel-pruned spec over
them, one discriminated union (`architecture_adapter`) and the `REGISTRY`; and, for any of them, the expected
state dict, input shape and parameter count (`arch.layouts` walks the layers)."""

from __future__ import annotations

import math
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

from arch.layouts import StateDictLayout, base_layers, pruned_widths
from arch.specs import (
    BaseArchitectureSpec,
    BaseSpec,
    CNNSpec,
    MLPSpec,
    MobileNetV2Spec,
    OnnxSpec,
    ResNet18Spec,
    ResNet20Spec,
    ResNet34Spec,
    ResNet50Spec,
    ResNet56Spec,
    VGG16BNSpec,
)

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # state_dict entries that are no parameters
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
        pruned_widths(self.base, self.layers)  # raises ValueError with the reason
        return self

    @model_serializer(mode="wrap")
    def _dump_with_base_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {**handler(self), **self.base_fields()}


AnySpec = BaseSpec | PrunedSpec | OnnxSpec

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


def expected_state_dict(spec: AnySpec) -> StateDictLayout:
    """Names of the torch module's state_dict() in order (parameters and buffers), each mapped to
    (shape, dtype kind). A pruned spec has its base's names with the pruned layers' shapes. An imported ONNX
    graph has none here (its weights are written by the server from the graph): ValueError."""
    if isinstance(spec, OnnxSpec):
        raise ValueError("an imported ONNX model's state dict is read from its graph")
    if spec.name == "pruned":
        return base_layers(spec.base).layout(pruned_widths(spec.base, spec.layers))
    return base_layers(spec).layout()


def input_shape(spec: AnySpec) -> list[int]:
    """Shape of one input example, without the batch dimension (a pruned model takes its base's)."""
    if isinstance(spec, OnnxSpec):
        return list(spec.input_shape)
    if spec.name == "pruned":
        return input_shape(spec.base)
    if spec.name == "mlp":
        return [spec.in_features]
    return [spec.in_channels, spec.image_size, spec.image_size]


def parameter_count(spec: AnySpec) -> int:
    """Trainable parameters (weights, biases, BatchNorm affine); buffers are not counted."""
    if isinstance(spec, OnnxSpec):
        return spec.parameter_count
    return sum(
        math.prod(shape)
        for name, (shape, _) in expected_state_dict(spec).items()
        if name.rsplit(".", 1)[-1] not in BUFFERS
    )
