"""The JSON architecture specs (pure Python) against the torch modules built from them, and weight
loading from safetensors."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from service.architectures import (
    REGISTRY,
    CNNSpec,
    MLPSpec,
    architecture_adapter,
    expected_state_dict,
    input_shape,
    parameter_count,
    state_dict_mismatch,
)
from worker.engine.architectures import build_model, load_weights
from worker.engine.errors import EngineError

REPO_ROOT = Path(__file__).resolve().parents[2]

SPECS = [
    {"name": "mlp", "in_features": 64, "hidden": [128, 64], "num_classes": 10},
    {"name": "mlp", "in_features": 30, "hidden": [], "num_classes": 2},
    {"name": "mlp", "in_features": 5, "hidden": [7, 3, 9, 4], "num_classes": 3},
    {"name": "cnn", "in_channels": 3, "image_size": 32, "channels": [8, 16], "num_classes": 10},
    {"name": "cnn", "in_channels": 1, "image_size": 8, "channels": [4], "num_classes": 2},
    # 5 → 2 → 1: the last blocks run on a 1×1 map (Identity instead of MaxPool).
    {"name": "cnn", "in_channels": 2, "image_size": 5, "channels": [3, 4, 5, 6], "num_classes": 7},
]


def _kind(tensor: torch.Tensor) -> str:
    return "float" if tensor.is_floating_point() else "int"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s['name']}-{s.get('hidden', s.get('channels'))}")
def test_expected_state_dict_matches_the_torch_module(spec: dict) -> None:
    validated = architecture_adapter.validate_python(spec)
    model = build_model(spec)
    actual = {name: (tuple(t.shape), _kind(t)) for name, t in model.state_dict().items()}
    expected = expected_state_dict(validated)
    assert list(actual) == list(expected)  # same names in the same order
    assert actual == expected


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s['name']}-{s.get('hidden', s.get('channels'))}")
def test_parameter_count_and_forward_on_input_shape(spec: dict) -> None:
    validated = architecture_adapter.validate_python(spec)
    model = build_model(spec)
    assert parameter_count(validated) == sum(p.numel() for p in model.parameters())
    logits = model(torch.randn(3, *input_shape(validated)))
    assert logits.shape == (3, spec["num_classes"])


def test_parameter_count_by_hand() -> None:
    mlp = MLPSpec(name="mlp", in_features=64, hidden=[128, 64], num_classes=10)
    assert parameter_count(mlp) == (64 * 128 + 128) + (128 * 64 + 64) + (64 * 10 + 10)
    cnn = CNNSpec(name="cnn", in_channels=3, image_size=32, channels=[8, 16], num_classes=10)
    # conv (no bias) + BN weight and bias per block, then the classifier.
    assert parameter_count(cnn) == (8 * 3 * 9 + 2 * 8) + (16 * 8 * 9 + 2 * 16) + (16 * 10 + 10)


def test_mlp_flattens_image_input() -> None:
    model = build_model({"name": "mlp", "in_features": 64, "hidden": [16], "num_classes": 10})
    images = torch.randn(4, 1, 8, 8)
    assert torch.equal(model(images), model(images.reshape(4, 64)))


def test_input_shape() -> None:
    assert input_shape(MLPSpec(name="mlp", in_features=30, hidden=[], num_classes=2)) == [30]
    cnn = CNNSpec(name="cnn", in_channels=3, image_size=32, channels=[8], num_classes=10)
    assert input_shape(cnn) == [3, 32, 32]


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "mlp", "in_features": 0, "hidden": [], "num_classes": 2},
        {"name": "mlp", "in_features": 4, "hidden": [0], "num_classes": 2},
        {"name": "mlp", "in_features": 4, "hidden": [8] * 17, "num_classes": 2},
        {"name": "mlp", "in_features": 4, "hidden": [], "num_classes": 1},
        {"name": "mlp", "in_features": True, "hidden": [], "num_classes": 2},
        {"name": "mlp", "in_features": 4, "hidden": [], "num_classes": 2, "dropout": 0.5},
        {"name": "cnn", "in_channels": 3, "image_size": 3, "channels": [8], "num_classes": 2},
        {"name": "cnn", "in_channels": 3, "image_size": 32, "channels": [], "num_classes": 2},
        {"name": "cnn", "in_channels": 65, "image_size": 32, "channels": [8], "num_classes": 2},
        {"name": "resnet", "in_features": 4},
    ],
)
def test_invalid_specs_are_rejected(spec: dict) -> None:
    with pytest.raises(ValidationError):
        architecture_adapter.validate_python(spec)
    with pytest.raises(EngineError, match="architecture spec is invalid"):
        build_model(spec)


def test_registry_lists_every_spec_with_a_json_schema() -> None:
    assert set(REGISTRY) == {"mlp", "cnn"}
    for name, spec_class in REGISTRY.items():
        schema = spec_class.model_json_schema()
        assert schema["properties"]["name"]["const"] == name
        assert schema["additionalProperties"] is False
        for example in schema["examples"]:
            assert architecture_adapter.validate_python(example).name == name


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[3]], ids=["mlp", "cnn"])
def test_load_weights_round_trip(spec: dict, tmp_path: Path) -> None:
    source = build_model(spec)
    with torch.no_grad():  # make the BN buffers differ from a fresh module's too
        for tensor in source.state_dict().values():
            if tensor.is_floating_point():
                tensor.uniform_(0.5, 2.0)
            else:
                tensor.fill_(7)
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), path)
    target = build_model(spec).train()
    load_weights(target, path)
    assert not target.training
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name


MLP_SPEC = {"name": "mlp", "in_features": 64, "hidden": [128], "num_classes": 10}


def _save(tensors: dict[str, torch.Tensor], tmp_path: Path) -> Path:
    path = tmp_path / "weights.safetensors"
    save_file(tensors, path)
    return path


def test_load_weights_raises_the_mismatch_message(tmp_path: Path) -> None:
    state = dict(build_model(MLP_SPEC).state_dict())
    state["layers.0.weight"] = torch.zeros(128, 30)
    expected = (
        "weights do not fit architecture mlp: "
        "layers.0.weight has shape [128, 30], the architecture expects [128, 64]"
    )
    with pytest.raises(EngineError) as raised:
        load_weights(build_model(MLP_SPEC), _save(state, tmp_path))
    assert str(raised.value) == expected


def test_load_weights_rejects_a_wrong_dtype_kind(tmp_path: Path) -> None:
    spec = SPECS[4]
    state = dict(build_model(spec).state_dict())
    state["features.1.num_batches_tracked"] = torch.tensor(3.0)
    expected = r"features\.1\.num_batches_tracked is a float tensor, the architecture expects an int tensor"
    with pytest.raises(EngineError, match=expected):
        load_weights(build_model(spec), _save(state, tmp_path))


def test_load_weights_rejects_non_finite_values(tmp_path: Path) -> None:
    state = dict(build_model(MLP_SPEC).state_dict())
    state["layers.2.bias"] = torch.full((10,), math.nan)
    with pytest.raises(EngineError, match=r"NaN or infinite values in layers\.2\.bias"):
        load_weights(build_model(MLP_SPEC), _save(state, tmp_path))


def test_load_weights_rejects_a_file_that_is_not_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(EngineError, match="not a readable safetensors file"):
        load_weights(build_model(MLP_SPEC), path)


LAYOUT = {
    "layers.0.weight": ((128, 64), "float"),
    "layers.0.bias": ((128,), "float"),
    "layers.1.weight": ((10, 128), "float"),
    "bn.num_batches_tracked": ((), "int"),
}


def test_state_dict_mismatch_none_when_it_fits() -> None:
    # Shapes as lists or tuples alike: a safetensors header gives lists, torch gives torch.Size.
    found = {key: (list(shape), kind) for key, (shape, kind) in LAYOUT.items()}
    assert state_dict_mismatch("mlp", LAYOUT, found) is None


def test_state_dict_mismatch_single_shape_mismatch() -> None:
    found = dict(LAYOUT) | {"layers.0.weight": ((128, 30), "float")}
    mismatch = state_dict_mismatch("mlp", LAYOUT, found)
    assert mismatch is not None
    assert mismatch.message == (
        "weights do not fit architecture mlp: layers.0.weight has shape [128, 30], the architecture expects [128, 64]"
    )
    assert mismatch.errors == [
        {"key": "layers.0.weight", "problem": "shape_mismatch", "shape": [128, 30], "expected_shape": [128, 64]}
    ]


def test_state_dict_mismatch_missing_unexpected_and_kind() -> None:
    found = dict(LAYOUT) | {"extra.weight": ((3,), "float"), "bn.num_batches_tracked": ((), "float")}
    del found["layers.1.weight"]
    mismatch = state_dict_mismatch("cnn", LAYOUT, found)
    assert mismatch is not None
    assert mismatch.message == (
        "weights do not fit architecture cnn: 1 key is missing from the file: layers.1.weight; "
        "1 key is not part of the architecture: extra.weight; "
        "bn.num_batches_tracked is a float tensor, the architecture expects an int tensor"
    )
    assert mismatch.errors == [
        {"key": "layers.1.weight", "problem": "missing", "expected_shape": [10, 128], "expected_kind": "float"},
        {"key": "extra.weight", "problem": "unexpected", "shape": [3], "kind": "float"},
        {"key": "bn.num_batches_tracked", "problem": "kind_mismatch", "kind": "float", "expected_kind": "int"},
    ]


def test_state_dict_mismatch_a_key_can_have_both_a_wrong_shape_and_a_wrong_kind() -> None:
    mismatch = state_dict_mismatch("x", {"w": ((2,), "float")}, {"w": ((3,), "bool")})
    assert mismatch is not None
    assert [e["problem"] for e in mismatch.errors] == ["shape_mismatch", "kind_mismatch"]
    assert mismatch.message.endswith("w has shape [3], the architecture expects [2]; w is a bool tensor, "
                                     "the architecture expects a float tensor")


def test_state_dict_mismatch_lists_first_five_and_counts_the_rest() -> None:
    expected = {f"w{i}": ((i + 1,), "float") for i in range(8)} | {f"k{i}": ((), "int") for i in range(6)}
    found = {f"w{i}": ((i + 2,), "float") for i in range(8)} | {f"k{i}": ((), "float") for i in range(6)}
    found |= {f"x{i}": ((1,), "float") for i in range(7)}
    mismatch = state_dict_mismatch("mlp", expected, found)
    assert mismatch is not None
    assert "7 keys are not part of the architecture: x0, x1, x2, x3, x4 and 2 more" in mismatch.message
    assert "w4 has shape [6], the architecture expects [5]" in mismatch.message
    assert "w5 has shape" not in mismatch.message
    assert "and 3 more shape mismatches" in mismatch.message
    assert "k4 is a float tensor" in mismatch.message and "k5 is" not in mismatch.message
    assert "and 1 more dtype mismatches" in mismatch.message
    problems = [e["problem"] for e in mismatch.errors]  # every key is in errors, not just the first five
    counts = {problem: problems.count(problem) for problem in set(problems)}
    assert counts == {"unexpected": 7, "shape_mismatch": 8, "kind_mismatch": 6}


def test_state_dict_mismatch_hints_at_a_wrapper_prefix() -> None:
    wrapped = {"module." + key: value for key, value in LAYOUT.items()}
    mismatch = state_dict_mismatch("mlp", LAYOUT, wrapped)
    assert mismatch is not None
    assert "4 keys are missing from the file" in mismatch.message
    assert mismatch.message.endswith(
        "every key in the file starts with 'module.' (a wrapper such as DataParallel?): save the "
        "inner model's state_dict, or strip the 'module.' prefix from the keys"
    )


def test_state_dict_mismatch_hints_at_a_missing_prefix() -> None:
    prefixed = {"net." + key: value for key, value in LAYOUT.items()}
    mismatch = state_dict_mismatch("mlp", prefixed, LAYOUT)
    assert mismatch is not None
    assert mismatch.message.endswith(
        "the architecture's keys start with 'net.' but the file's do not: add the 'net.' prefix to the keys, "
        "or pick the architecture that matches the saved module"
    )


def test_service_architectures_imports_neither_torch_nor_numpy() -> None:
    code = (
        "import sys, service.architectures; "
        "heavy = sorted(m for m in ('torch', 'numpy') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)
