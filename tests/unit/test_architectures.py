"""The JSON architecture specs and layouts of `arch` (pure Python) against the torch modules the engine
builds from the same tables, the layering of the two, and weight loading from safetensors."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from arch.mismatch import state_dict_mismatch
from arch.registry import REGISTRY, PrunedSpec, architecture_adapter, expected_state_dict, input_shape, parameter_count
from arch.specs import CNNSpec, MLPSpec, ResNet20Spec
from arch.tables import CIFAR_STEM, TABLES, MobileNetV2Table, ResNetTable, VGGTable
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
    assert list(REGISTRY) == ["mlp", "cnn", *NAMED, "pruned"]
    for name, spec_class in REGISTRY.items():
        schema = spec_class.model_json_schema()
        assert schema["properties"]["name"]["const"] == name
        assert schema["additionalProperties"] is False
        assert schema["description"]  # the docstring: GET /v1/architectures shows it
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
        "weights do not fit architecture mlp: layers.0.weight has shape [128, 30], the architecture expects [128, 64]"
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
    assert mismatch.message.endswith(
        "w has shape [3], the architecture expects [2]; w is a bool tensor, the architecture expects a float tensor"
    )


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


def _imports(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


def test_arch_imports_neither_torch_nor_numpy_nor_the_service_or_the_worker() -> None:
    _imports(
        "import sys, arch, arch.layouts, arch.mismatch, arch.registry, arch.specs, arch.tables; "
        "loaded = sorted(m for m in ('torch', 'numpy', 'service', 'worker') if m in sys.modules); "
        "assert not loaded, loaded"
    )


def test_the_engine_imports_neither_the_service_nor_its_settings() -> None:
    _imports(
        "import importlib, pkgutil, sys, worker.engine; "
        "[importlib.import_module(f'worker.engine.{m.name}') for m in pkgutil.iter_modules(worker.engine.__path__)]; "
        "loaded = sorted(m for m in ('service', 'pydantic_settings') if m in sys.modules); "
        "assert not loaded, loaded"
    )


# --- Named architectures: torchvision's and chenyaofo/pytorch-cifar-models' state-dict layouts ---

NAMED = ["resnet18", "resnet34", "resnet50", "vgg16_bn", "mobilenet_v2", "resnet20", "resnet56"]
IMAGENET = NAMED[:5]
# Small enough to keep CPU forwards fast; every ImageNet architecture ends in adaptive pooling.
NAMED_SPECS = {name: {"name": name, "num_classes": 10, "image_size": 64 if name in IMAGENET else 32} for name in NAMED}


@pytest.fixture(scope="module")
def named_models() -> dict[str, torch.nn.Module]:
    """Each named architecture built once (VGG-16-BN alone has 134M parameters at 10 classes)."""
    return {name: build_model(spec) for name, spec in NAMED_SPECS.items()}


def _random_state(layout: dict) -> dict[str, torch.Tensor]:
    """Tensors for a layout, values a fresh module would not have (running_var stays positive)."""
    generator = torch.Generator().manual_seed(0)
    return {
        key: torch.rand(shape, generator=generator) + 0.5 if kind == "float" else torch.full(shape, 7)
        for key, (shape, kind) in layout.items()
    }


REGISTRY_EXAMPLES = [
    (name, example) for name, spec_class in REGISTRY.items() for example in spec_class.model_json_schema()["examples"]
]


def _layout_of(model: torch.nn.Module) -> dict:
    return {key: (tuple(t.shape), _kind(t)) for key, t in model.state_dict().items()}


def test_every_registry_architecture_has_an_example() -> None:
    assert {name for name, _ in REGISTRY_EXAMPLES} == set(REGISTRY)


@pytest.mark.parametrize(("name", "example"), REGISTRY_EXAMPLES, ids=[name for name, _ in REGISTRY_EXAMPLES])
def test_every_registry_architecture_builds_its_expected_layout(name: str, example: dict) -> None:
    spec = architecture_adapter.validate_python(example)
    model = build_model(example)
    expected = expected_state_dict(spec)
    assert list(_layout_of(model)) == list(expected)  # same names in the same order
    assert _layout_of(model) == expected  # same shapes and dtype kinds
    assert parameter_count(spec) == sum(p.numel() for p in model.parameters())


# Small tables of each family, to show that the modules and the layouts follow whatever `TABLES` says.
SMALL_TABLES = {
    "resnet20": ResNetTable("bottleneck", (1, 2), (4, 8), CIFAR_STEM),
    "vgg16_bn": VGGTable(config=(4, "M", 8, 8, "M"), pool_size=2, hidden=16),
    "mobilenet_v2": MobileNetV2Table(stem=8, setting=((1, 8, 1, 1), (6, 16, 2, 2)), last=32),
}


@pytest.mark.parametrize("name", list(SMALL_TABLES))
def test_modules_and_layouts_are_both_built_from_the_one_table(name: str, monkeypatch) -> None:
    spec = architecture_adapter.validate_python({"name": name, "image_size": 32})
    default_layout = expected_state_dict(spec)
    monkeypatch.setitem(TABLES, name, SMALL_TABLES[name])
    model = build_model(spec.model_dump())
    expected = expected_state_dict(spec)
    assert expected != default_layout
    assert list(_layout_of(model)) == list(expected)
    assert _layout_of(model) == expected
    with torch.no_grad():
        assert model(torch.randn(2, *input_shape(spec))).shape == (2, spec.num_classes)


@pytest.mark.parametrize("name", NAMED)
def test_named_forward_on_input_shape(name: str, named_models: dict) -> None:
    spec = architecture_adapter.validate_python(NAMED_SPECS[name])
    model = named_models[name]
    assert not model.training
    with torch.no_grad():
        logits = model(torch.randn(2, *input_shape(spec)))
    assert logits.shape == (2, 10)
    assert logits.isfinite().all()


def test_resnet18_forward_at_the_default_image_size() -> None:
    spec = architecture_adapter.validate_python({"name": "resnet18", "num_classes": 3})
    assert input_shape(spec) == [3, 224, 224]
    with torch.no_grad():
        assert build_model(spec.model_dump())(torch.randn(1, 3, 224, 224)).shape == (1, 3)


# torchvision's documented parameter counts (ImageNet heads); He et al.'s CIFAR ResNets with the
# 1×1 conv + BN shortcut of chenyaofo/pytorch-cifar-models at 10 classes (0.27M and 0.86M).
PARAMETER_COUNTS = {
    ("resnet18", 1000): 11_689_512,
    ("resnet34", 1000): 21_797_672,
    ("resnet50", 1000): 25_557_032,
    ("vgg16_bn", 1000): 138_365_992,
    ("mobilenet_v2", 1000): 3_504_872,
    ("resnet20", 10): 272_474,
    ("resnet56", 10): 855_770,
    ("resnet20", 100): 278_324,
    ("resnet56", 100): 861_620,
}


@pytest.mark.parametrize(("name", "num_classes"), list(PARAMETER_COUNTS))
def test_named_parameter_counts(name: str, num_classes: int) -> None:
    spec = architecture_adapter.validate_python({"name": name, "num_classes": num_classes})
    assert parameter_count(spec) == PARAMETER_COUNTS[name, num_classes]


# len(model.state_dict()) of torchvision's models (parameters and BatchNorm buffers).
STATE_DICT_LENGTHS = {"resnet18": 122, "resnet34": 218, "resnet50": 320, "vgg16_bn": 97, "mobilenet_v2": 314}

# Exact entries of torchvision's (and chenyaofo's) state dicts at their default heads.
KNOWN_ENTRIES = {
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.num_batches_tracked": (),
        "layer1.1.conv2.weight": (64, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer4.1.conv2.weight": (512, 512, 3, 3),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    },
    "resnet34": {
        "layer3.5.conv2.weight": (256, 256, 3, 3),
        "layer4.0.downsample.1.running_var": (512,),
        "layer4.2.bn2.weight": (512,),
        "fc.weight": (1000, 512),
    },
    "resnet50": {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer2.0.downsample.0.weight": (512, 256, 1, 1),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "layer4.2.bn3.running_mean": (2048,),
        "fc.weight": (1000, 2048),
    },
    "vgg16_bn": {
        "features.0.weight": (64, 3, 3, 3),
        "features.0.bias": (64,),
        "features.1.running_mean": (64,),
        "features.7.weight": (128, 64, 3, 3),
        "features.40.weight": (512, 512, 3, 3),
        "features.41.num_batches_tracked": (),
        "classifier.0.weight": (4096, 25088),
        "classifier.3.weight": (4096, 4096),
        "classifier.6.weight": (1000, 4096),
    },
    "mobilenet_v2": {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.running_var": (16,),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.2.conv.3.weight": (24,),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "features.18.1.num_batches_tracked": (),
        "classifier.1.weight": (1000, 1280),
    },
    "resnet20": {
        "conv1.weight": (16, 3, 3, 3),
        "layer1.2.conv2.weight": (16, 16, 3, 3),
        "layer2.0.conv1.weight": (32, 16, 3, 3),
        "layer2.0.downsample.0.weight": (32, 16, 1, 1),
        "layer3.0.downsample.1.running_mean": (64,),
        "layer3.2.conv2.weight": (64, 64, 3, 3),
        "fc.weight": (10, 64),
    },
    "resnet56": {
        "layer1.8.bn2.weight": (16,),
        "layer2.8.conv1.weight": (32, 32, 3, 3),
        "layer3.8.conv2.weight": (64, 64, 3, 3),
        "fc.weight": (10, 64),
    },
}
ABSENT_KEYS = {
    "resnet18": ["layer1.0.downsample.0.weight", "layer1.0.conv3.weight", "maxpool.weight"],
    "resnet50": ["layer2.1.downsample.0.weight", "layer5.0.conv1.weight"],
    "vgg16_bn": ["features.2.weight", "features.43.weight", "classifier.1.weight"],
    "mobilenet_v2": ["features.1.conv.3.weight", "features.19.0.weight", "classifier.0.weight"],
    "resnet20": ["layer1.0.downsample.0.weight", "layer4.0.conv1.weight", "layer1.3.conv1.weight"],
    "resnet56": ["layer1.9.conv1.weight"],
}


@pytest.mark.parametrize("name", NAMED)
def test_named_layouts_pin_known_entries(name: str) -> None:
    layout = expected_state_dict(architecture_adapter.validate_python({"name": name}))
    for key, shape in KNOWN_ENTRIES[name].items():
        assert layout[key][0] == shape, key
        assert layout[key][1] == ("int" if key.endswith("num_batches_tracked") else "float")
    for key in ABSENT_KEYS.get(name, []):
        assert key not in layout
    if name in STATE_DICT_LENGTHS:
        assert len(layout) == STATE_DICT_LENGTHS[name]


def test_resnet_state_dict_order_follows_module_registration() -> None:
    keys = list(expected_state_dict(architecture_adapter.validate_python({"name": "resnet50"})))
    assert keys[:8] == [
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "layer1.0.conv1.weight",
        "layer1.0.bn1.weight",
    ]
    block = [key for key in keys if key.startswith("layer1.0.") and key.endswith(".weight")]
    assert block == [
        "layer1.0.conv1.weight",
        "layer1.0.bn1.weight",
        "layer1.0.conv2.weight",
        "layer1.0.bn2.weight",
        "layer1.0.conv3.weight",
        "layer1.0.bn3.weight",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.weight",
    ]
    assert keys[-2:] == ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("name", NAMED)
def test_named_models_load_a_state_dict_strictly(name: str) -> None:
    # A state dict keyed by the layout's (torchvision's) names, as a user's save_file(state_dict) has it.
    spec = NAMED_SPECS[name]
    state = _random_state(expected_state_dict(architecture_adapter.validate_python(spec)))
    model = build_model(spec)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], tensor) for key, tensor in state.items())


def test_named_model_load_weights_round_trip(tmp_path: Path) -> None:
    spec = ResNet20Spec(name="resnet20", num_classes=100)
    state = _random_state(expected_state_dict(spec))
    path = _save(state, tmp_path)
    model = build_model(spec.model_dump()).train()
    load_weights(model, path)
    assert not model.training
    assert all(torch.equal(model.state_dict()[key], tensor) for key, tensor in state.items())
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_named_model_load_weights_names_the_architecture(tmp_path: Path) -> None:
    # cifar10_resnet20 weights offered as a 100-class model.
    path = _save(_random_state(expected_state_dict(ResNet20Spec(name="resnet20"))), tmp_path)
    with pytest.raises(EngineError) as raised:
        load_weights(build_model({"name": "resnet20", "num_classes": 100}), path)
    assert str(raised.value) == (
        "weights do not fit architecture resnet20: fc.weight has shape [10, 64], the architecture expects "
        "[100, 64]; fc.bias has shape [10], the architecture expects [100]"
    )


@pytest.mark.parametrize("name", NAMED)
def test_named_specs_defaults_and_image_fields(name: str) -> None:
    spec = architecture_adapter.validate_python({"name": name})
    dumped = spec.model_dump()
    # worker.pipeline.check_inputs_fit reads these three from any non-MLP architecture.
    assert dumped["in_channels"] == 3
    assert input_shape(spec) == [dumped["in_channels"], dumped["image_size"], dumped["image_size"]]
    if name in IMAGENET:
        assert (dumped["num_classes"], dumped["image_size"]) == (1000, 224)
    else:
        assert (dumped["num_classes"], dumped["image_size"]) == (10, 32)
    assert architecture_adapter.validate_python(dumped) == spec


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "resnet18", "in_channels": 1},
        {"name": "resnet18", "image_size": 16},
        {"name": "resnet50", "num_classes": 1},
        {"name": "resnet34", "num_classes": "10"},
        {"name": "vgg16_bn", "batch_norm": False},
        {"name": "mobilenet_v2", "width_mult": 0.5},
        {"name": "resnet20", "image_size": 4},
        {"name": "resnet56", "channels": [16, 32, 64]},
        {"name": "resnet101"},
    ],
)
def test_invalid_named_specs_are_rejected(spec: dict) -> None:
    with pytest.raises(ValidationError):
        architecture_adapter.validate_python(spec)
    with pytest.raises(EngineError, match="architecture spec is invalid"):
        build_model(spec)


# A CNN with half its channels pruned, as ChannelPruner records it (every Conv, BatchNorm and Linear).
PRUNED_CNN_BASE = {"name": "cnn", "in_channels": 3, "image_size": 8, "channels": [6, 8], "num_classes": 4}
PRUNED_CNN = {
    "name": "pruned",
    "version": 1,
    "base": PRUNED_CNN_BASE,
    "layers": {
        "features.0": {"in_channels": 3, "out_channels": 3, "groups": 1},
        "features.1": {"num_features": 3},
        "features.4": {"in_channels": 3, "out_channels": 4, "groups": 1},
        "features.5": {"num_features": 4},
        "classifier": {"in_features": 4, "out_features": 4},
    },
}


def _with_layer(spec: dict, name: str, widths: dict) -> dict:
    return {**spec, "layers": {**spec["layers"], name: widths}}


def test_pruned_spec_layout_shrinks_the_named_layers() -> None:
    spec = architecture_adapter.validate_python(PRUNED_CNN)
    layout = expected_state_dict(spec)
    base = expected_state_dict(architecture_adapter.validate_python(PRUNED_CNN_BASE))
    assert list(layout) == list(base)  # the base's names, in the base's order
    assert layout["features.0.weight"] == ((3, 3, 3, 3), "float")
    assert layout["features.1.running_var"] == ((3,), "float")
    assert layout["features.1.num_batches_tracked"] == ((), "int")
    assert layout["features.4.weight"] == ((4, 3, 3, 3), "float")
    assert layout["classifier.weight"] == ((4, 4), "float") and layout["classifier.bias"] == ((4,), "float")
    assert parameter_count(spec) == (3 * 3 * 9 + 2 * 3) + (4 * 3 * 9 + 2 * 4) + (4 * 4 + 4)
    assert input_shape(spec) == [3, 8, 8]
    # Unlisted layers keep the base's widths.
    partial = {**PRUNED_CNN, "layers": {"features.4": {"in_channels": 6, "out_channels": 8, "groups": 1}}}
    assert expected_state_dict(architecture_adapter.validate_python(partial)) == base
    # The dense model's weights do not fit the pruned architecture, and the mismatch says where.
    mismatch = state_dict_mismatch("pruned", layout, base)
    assert mismatch is not None and "features.0.weight has shape [6, 3, 3, 3]" in mismatch.message


def test_pruned_spec_exposes_and_dumps_its_base_fields() -> None:
    spec = architecture_adapter.validate_python(PRUNED_CNN)
    assert isinstance(spec, PrunedSpec)
    assert (spec.num_classes, spec.in_channels, spec.image_size) == (4, 3, 8)
    assert not hasattr(spec, "in_features")
    dumped = spec.model_dump()
    # worker.pipeline.check_inputs_fit and service.catalog read these from any stored architecture.
    assert {key: dumped[key] for key in ("name", "num_classes", "in_channels", "image_size")} == {
        "name": "pruned",
        "num_classes": 4,
        "in_channels": 3,
        "image_size": 8,
    }
    assert architecture_adapter.validate_python(dumped) == spec
    assert architecture_adapter.validate_json(spec.model_dump_json()) == spec

    mlp = architecture_adapter.validate_python(
        {
            "name": "pruned",
            "version": 1,
            "base": {"name": "mlp", "in_features": 64, "hidden": [16], "num_classes": 10},
            "layers": {
                "layers.0": {"in_features": 64, "out_features": 8},
                "layers.2": {"in_features": 8, "out_features": 10},
            },
        }
    )
    assert (mlp.num_classes, mlp.in_features) == (10, 64) and input_shape(mlp) == [64]
    assert not hasattr(mlp, "in_channels") and "image_size" not in mlp.model_dump()
    assert mlp.model_dump()["in_features"] == 64 and parameter_count(mlp) == (64 * 8 + 8) + (8 * 10 + 10)
    assert architecture_adapter.validate_python(mlp.model_dump()) == mlp


DEPTHWISE = "features.1.conv.0.0"  # MobileNetV2's first depthwise conv: 32 channels, groups 32


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (_with_layer(PRUNED_CNN, "features.9", {"num_features": 2}), "'features.9' is not a Conv, Linear or BatchNorm"),
        (_with_layer(PRUNED_CNN, "features.2", {"num_features": 2}), "'features.2' is not a Conv"),  # the ReLU
        (
            _with_layer(PRUNED_CNN, "features.0", {"in_channels": 3, "out_channels": 7, "groups": 1}),
            "features.0.out_channels is 7, more than the 6 of cnn",
        ),
        (_with_layer(PRUNED_CNN, "features.1", {"num_features": 0}), "greater than or equal to 1"),
        (_with_layer(PRUNED_CNN, "features.1", {"num_features": True}), "valid integer"),
        (_with_layer(PRUNED_CNN, "features.1", {"num_features": 3, "eps": 1}), "must give exactly num_features"),
        (_with_layer(PRUNED_CNN, "features.0", {"in_channels": 3, "out_channels": 3}), "must give exactly groups"),
        (
            _with_layer(PRUNED_CNN, "features.0", {"in_channels": 3, "out_channels": 3, "groups": 3}),
            "features.0 has groups 1 in cnn, got 3",
        ),
        (
            _with_layer(PRUNED_CNN, "features.1", {"num_features": 2}),
            "features.1.num_features is 2 but the convolution before it, features.0, has 3 output channels",
        ),
        (
            _with_layer(PRUNED_CNN, "features.0", {"in_channels": 2, "out_channels": 3, "groups": 1}),
            "the input of the model cannot be pruned",
        ),
        (
            _with_layer(PRUNED_CNN, "classifier", {"in_features": 4, "out_features": 3}),
            "the classifier's outputs \\(num_classes\\) cannot be pruned",
        ),
        (
            {
                "name": "pruned",
                "version": 1,
                "base": {"name": "mobilenet_v2", "image_size": 32},
                "layers": {DEPTHWISE: {"in_channels": 16, "out_channels": 16, "groups": 8}},
            },
            "depthwise convolution, so groups, in_channels and out_channels must be equal",
        ),
        ({**PRUNED_CNN, "base": PRUNED_CNN}, "does not match any of the expected tags"),  # no nesting
        ({**PRUNED_CNN, "version": 2}, "version"),
        ({**PRUNED_CNN, "width": 0.5}, "Extra inputs are not permitted"),
        ({**PRUNED_CNN, "num_classes": 5}, "num_classes is 5 but the base architecture has 4"),
        ({**PRUNED_CNN, "in_features": 3}, "in_features is not a field of a pruned cnn architecture"),
        ({**PRUNED_CNN, "layers": {f"features.{i}": {"num_features": 1} for i in range(1025)}}, "at most 1024"),
        ({**PRUNED_CNN, "base": {**PRUNED_CNN_BASE, "channels": []}}, "base.cnn.channels"),
    ],
)
def test_invalid_pruned_specs_are_rejected_with_the_reason(spec: dict, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        architecture_adapter.validate_python(spec)
    with pytest.raises(EngineError, match="architecture spec is invalid"):
        build_model(spec)
