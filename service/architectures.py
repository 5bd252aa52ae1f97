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
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, TypeAdapter

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


ArchitectureSpec = Annotated[MLPSpec | CNNSpec, Field(discriminator="name")]
architecture_adapter: TypeAdapter[MLPSpec | CNNSpec] = TypeAdapter(ArchitectureSpec)

REGISTRY: dict[str, type[BaseModel]] = {"mlp": MLPSpec, "cnn": CNNSpec}


def _linear(prefix: str, in_features: int, out_features: int) -> StateDictLayout:
    return {
        f"{prefix}.weight": ((out_features, in_features), "float"),
        f"{prefix}.bias": ((out_features,), "float"),
    }


def _mlp_state_dict(spec: MLPSpec) -> StateDictLayout:
    widths = [spec.in_features, *spec.hidden, spec.num_classes]
    layout: StateDictLayout = {}
    # Linear layers sit at even indices of `layers`; the ReLUs between them hold no state.
    for i, (fan_in, fan_out) in enumerate(pairwise(widths)):
        layout |= _linear(f"layers.{2 * i}", fan_in, fan_out)
    return layout


def _cnn_state_dict(spec: CNNSpec) -> StateDictLayout:
    layout: StateDictLayout = {}
    # Each block is 4 modules (conv, bn, relu, pool); only conv and bn hold state.
    for i, (c_in, c_out) in enumerate(pairwise([spec.in_channels, *spec.channels])):
        conv, bn = f"features.{4 * i}", f"features.{4 * i + 1}"
        layout[f"{conv}.weight"] = ((c_out, c_in, 3, 3), "float")
        layout[f"{bn}.weight"] = ((c_out,), "float")
        layout[f"{bn}.bias"] = ((c_out,), "float")
        layout[f"{bn}.running_mean"] = ((c_out,), "float")
        layout[f"{bn}.running_var"] = ((c_out,), "float")
        layout[f"{bn}.num_batches_tracked"] = ((), "int")
    return layout | _linear("classifier", spec.channels[-1], spec.num_classes)


def expected_state_dict(spec: MLPSpec | CNNSpec) -> StateDictLayout:
    """Names of the torch module's state_dict() in order (parameters and buffers), each mapped to
    (shape, dtype kind)."""
    if isinstance(spec, MLPSpec):
        return _mlp_state_dict(spec)
    return _cnn_state_dict(spec)


def input_shape(spec: MLPSpec | CNNSpec) -> list[int]:
    """Shape of one input example, without the batch dimension."""
    if isinstance(spec, MLPSpec):
        return [spec.in_features]
    return [spec.in_channels, spec.image_size, spec.image_size]


def parameter_count(spec: MLPSpec | CNNSpec) -> int:
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
