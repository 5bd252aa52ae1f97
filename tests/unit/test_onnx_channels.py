"""Channel pruning of imported ONNX graphs: Torch-Pruning on the converted module against Torch-Pruning on the
torch module that was exported (same channels removed, same logits), the pruned graph written back against
onnxruntime, the merge-only Reshape rule against brute force, and the refusal where the channels cannot be
followed."""

from __future__ import annotations

import hashlib
import itertools
import math

import numpy as np
import onnx
import pytest
import torch
import torch_pruning as tp

from arch.specs import OnnxSpec
from tests.onnx_models import MODELS, exported, seeded_model
from worker.engine.architectures import attach_spec
from worker.engine.errors import EngineError
from worker.engine.onnx_graph import build_onnx_module
from worker.engine.onnx_model import graph_with_weights
from worker.engine.onnx_reference import compare_with_onnxruntime
from worker.engine.onnx_reshape import merge_groups
from worker.engine.structured import ChannelPruner


def imported(name: str, opset: int):
    data = exported(name, opset)
    module = build_onnx_module(onnx.load_model_from_string(data))
    spec = OnnxSpec(
        name="onnx",
        graph_sha256=hashlib.sha256(data).hexdigest(),
        input_shape=list(MODELS[name][1]),
        num_classes=10,
        opset=opset,
        ops=sorted({node.op_type for node in onnx.load_model_from_string(data).graph.node}),
        parameter_count=sum(p.numel() for p in module.parameters()),
        prunable_layers=[],
        reference={"max_abs_difference": 0.0, "tolerance": 1e-4},
    )
    attach_spec(module, spec)
    return module, data


def rows(name: str, batch: int = 16) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((batch, *MODELS[name][1])).astype(np.float32)


def source_pruned(name: str, ratio: float) -> tuple[torch.nn.Module, dict[str, list[int]]]:
    """Torch-Pruning, as ChannelPruner calls it, on the torch module that was exported."""
    model = seeded_model(name)
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs=torch.zeros(1, *MODELS[name][1]),
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio - 1e-9,
        ignored_layers=[classifier],
    )
    pruner.step()
    removed = {layer: sorted(int(i) for i in idx) for layer, out, idx in pruner.pruning_history() if out}
    return model.eval(), removed


@pytest.mark.parametrize(("name", "opset"), [("resnet_style", 17), ("tabular_gelu", 21)])
def test_same_channels_and_logits_as_torch_pruning_on_the_exported_module(name, opset):
    module, data = imported(name, opset)
    pruned = ChannelPruner().prune(module, 0.5)
    source, removed = source_pruned(name, 0.5)
    assert removed and pruned.removed_channels == removed
    x = torch.from_numpy(rows(name))
    with torch.no_grad():
        np.testing.assert_allclose(pruned.model(x).numpy(), source(x).numpy(), atol=1e-5)
    dense = {k: v.shape for k, v in module.state_dict().items()}  # pruned a copy: the dense module as it was
    assert dense == {k: v.shape for k, v in imported(name, opset)[0].state_dict().items()}
    assert sum(p.numel() for p in pruned.model.parameters()) < 0.5 * sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("name", ["resnet_style", "mobilenet_style", "tabular_gelu"])
def test_pruned_graph_runs_in_onnxruntime_and_rebuilds(name, opset):
    module, data = imported(name, opset)
    pruned = ChannelPruner().prune(module, 0.5).model
    graph = graph_with_weights(pruned, data)
    proto = onnx.load_model_from_string(graph)
    onnx.checker.check_model(proto, full_check=True)
    agreement = compare_with_onnxruntime(pruned, graph, rows(name))
    assert agreement.agrees and agreement.max_abs_difference < 1e-5, agreement.describe()
    rebuilt = build_onnx_module(proto)  # what a mitigation placed 'after' this run starts from, with its weights
    rebuilt.load_state_dict(dict(pruned.state_dict()), strict=True)  # as from safetensors: no torch metadata
    x = torch.from_numpy(rows(name))
    with torch.no_grad():
        np.testing.assert_allclose(rebuilt(x).numpy(), pruned(x).numpy(), atol=1e-6)
    if name == "mobilenet_style":  # the depthwise conv keeps one group per remaining channel
        depthwise = next(n for n in proto.graph.node if n.op_type == "Conv" and "depthwise" in n.input[1])
        groups = next(a.i for a in depthwise.attribute if a.name == "group")
        assert groups == pruned.get_submodule("depthwise").out_channels < 8
    if name == "resnet_style":  # the flatten's Reshape reads the new width, and the old constant is gone
        reshape = next(n for n in proto.graph.node if n.op_type == "Reshape")
        shape = next(t for t in proto.graph.initializer if t.name == reshape.input[1])
        assert onnx.numpy_helper.to_array(shape).tolist() == [-1, pruned.get_submodule("fc").in_features]


def test_a_graph_whose_channels_cannot_be_followed_is_refused_with_the_reason():
    module, _ = imported("vit_style", 21)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(EngineError, match="channel pruning cannot remove channels from this imported graph"):
        ChannelPruner().prune(module, 0.5)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # the dense model untouched


def _compositions(n: int, parts: int):
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        yield tuple(b - a for a, b in itertools.pairwise(bounds))


def _valid(inputs, template, groups) -> bool:
    start = 0
    for index, (want, size) in enumerate(zip(template, groups, strict=True)):
        dims = inputs[start : start + size]
        if want == 0:
            if not (size == 1 and start == index):
                return False
        elif want != -1 and (any(isinstance(d, str) for d in dims) or math.prod(dims) != want):
            return False
        start += size
    return True


def test_merge_groups_against_brute_force():
    """Every merge-only reshape of small shapes (a symbolic batch first, sizes 1–4 after, every template of -1,
    0 and products) is recognised with a grouping that reproduces it; none is claimed where no grouping exists."""
    rng = np.random.default_rng(0)
    checked = recognised = 0
    for _ in range(3000):
        inputs = ["batch", *rng.integers(1, 5, rng.integers(1, 5)).tolist()]
        parts = int(rng.integers(1, len(inputs) + 1))
        true_groups = list(_compositions(len(inputs), parts))[
            int(rng.integers(0, math.comb(len(inputs) - 1, parts - 1)))
        ]
        template, start = [], 0
        for size in true_groups:
            dims = inputs[start : start + size]
            template.append(-1 if "batch" in dims else math.prod(dims))
            start += size
        if rng.random() < 0.3:  # split a dimension instead: no merge
            template.insert(1, 1)
            template[-1] = template[-1] * 2 if template[-1] != -1 else -1
        if template.count(-1) > 1:
            continue
        found = merge_groups(inputs, template, allowzero=0)
        exists = (
            any(_valid(inputs, template, g) for g in _compositions(len(inputs), len(template)))
            if len(template) <= len(inputs)
            else False
        )
        checked += 1
        if found is not None:
            recognised += 1
            assert _valid(inputs, template, found), (inputs, template, found)
        else:
            assert not exists, (inputs, template)
    assert checked > 2000 and recognised > 1000
