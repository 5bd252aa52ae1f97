"""Structured (filter/channel) pruning that removes channels physically, with Torch-Pruning, and what
the smaller model costs: parameters, MACs, file size and measured CPU latency.

`ChannelPruner` ranks the output channels of every Conv/Linear by a group L1 or L2 norm
(`torch_pruning.importance.MagnitudeImportance(p)`: each channel's norm in every layer the channel
touches — the conv's filter, its BatchNorm, the next layer's input slice — averaged over the group and
divided by the group's mean) and removes the lowest. Torch-Pruning's dependency graph prunes coupled
channels together, so residual additions (ResNet shortcuts, MobileNetV2 inverted residuals) and
depthwise convolutions stay consistent. The classifier's outputs (the last Linear) are never pruned.

The result describes its shape as a JSON-able "pruned architecture",

    {"version": 1, "base": <architecture spec>,
     "layers": {"conv1": {"in_channels": 3, "out_channels": 8, "groups": 1},
                "bn1": {"num_features": 8}, "fc": {"in_features": 32, "out_features": 10}, …}}

listing every Conv, Linear and BatchNorm. `rebuild_structured(spec, architecture)` builds the base
model and shrinks those layers to the recorded shapes, so a pruned model's safetensors file loads
back strictly (the weights are data; the architecture is the server's registry code plus integers).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch_pruning as tp
from safetensors.torch import save as safetensors_bytes
from torch import nn

from arch.registry import PrunedSpec, architecture_adapter, input_shape
from worker.engine.architectures import build_model, layer_widths, model_spec, shrink_layers
from worker.engine.errors import EngineError
from worker.engine.onnx_graph import OnnxModule
from worker.engine.pruning import Scope, check_layer_names, check_ratio, prunable_layers

Norm = Literal["l1", "l2"]
ARCHITECTURE_VERSION = 1
_NORMS = {"l1": 1, "l2": 2}


class PrunedModel(NamedTuple):
    model: nn.Module  # a pruned copy, in eval mode; the dense model is left as it was
    # JSON-able: rebuild_structured(spec, architecture) builds the same module. None for an imported ONNX graph,
    # whose structure is the pruned graph the run writes (`worker.engine.onnx_model.graph_with_weights`).
    architecture: dict[str, Any] | None
    removed_channels: dict[str, list[int]]  # Torch-Pruning's history: root layer → removed output channels


class ChannelPruner:
    """Removes output channels (conv filters, hidden units of Linear layers) by group L1/L2 norm:
    `ratio` of the channels of each coupled group ("layerwise": each group keeps ⌊(1 − ratio)·channels⌋,
    exactly for decimal ratios, at least one) or of all groups ranked together ("global": Torch-Pruning's
    global ranking, so per-layer width varies). `layer_ratios` (module name → ratio) overrides the ratio
    for the groups those layers root. `ignored_layers` keep their output channels (their inputs still
    shrink when the layer before them loses channels); the last Linear, the classifier, is always one."""

    def __init__(
        self,
        norm: Norm = "l1",
        scope: Scope = "layerwise",
        ignored_layers: Sequence[str] = (),
        layer_ratios: Mapping[str, float] | None = None,
    ) -> None:
        if norm not in _NORMS:
            raise EngineError(f"structured pruning norm must be 'l1' or 'l2', not {norm!r}")
        if scope not in ("global", "layerwise"):
            raise EngineError(f"pruning scope must be 'global' or 'layerwise', not {scope!r}")
        self.norm = norm
        self.scope = scope
        self.ignored_layers = tuple(ignored_layers)
        self.layer_ratios = dict(layer_ratios or {})
        for name, ratio in self.layer_ratios.items():
            check_ratio(ratio, f"pruning ratio of layer {name}")

    def prune(self, model: nn.Module, ratio: float) -> PrunedModel:
        """A physically smaller copy of `model` (from `build_model`: a registry architecture, or an imported ONNX
        graph, refused with the reason where Torch-Pruning cannot follow its channels)."""
        check_ratio(ratio)
        spec = _spec_of(model)
        layers = prunable_layers(model)
        check_layer_names(layers, self.ignored_layers, "ignored layers")
        check_layer_names(layers, list(self.layer_ratios), "layers given a pruning ratio")
        pruned = copy.deepcopy(model).eval()  # traced in eval mode: a forward must not move BN statistics
        modules = dict(pruned.named_modules())
        classifier = [name for name, module in layers.items() if isinstance(module, nn.Linear)][-1:]
        ignored = [modules[name] for name in dict.fromkeys([*self.ignored_layers, *classifier])]
        device = next(pruned.parameters()).device
        pruner = tp.pruner.BasePruner(
            pruned,
            example_inputs=torch.zeros(1, *input_shape(spec), device=device),
            importance=tp.importance.MagnitudeImportance(p=_NORMS[self.norm]),
            global_pruning=self.scope == "global",
            pruning_ratio=_floor_safe(ratio),
            pruning_ratio_dict={modules[name]: _floor_safe(r) for name, r in self.layer_ratios.items()} or None,
            ignored_layers=ignored,
        )
        if isinstance(pruned, OnnxModule):
            _step_imported(pruner, pruned, input_shape(spec), spec.num_classes)
        else:
            pruner.step()
        removed: dict[str, list[int]] = {}
        for name, out_channels, indices in pruner.pruning_history():
            if out_channels:
                removed.setdefault(name, []).extend(int(i) for i in indices)
        return PrunedModel(
            pruned.eval(),
            None if isinstance(pruned, OnnxModule) else pruned_architecture(pruned, spec),
            {name: sorted(indices) for name, indices in removed.items()},
        )


# What Torch-Pruning raises on a converted graph whose channels it cannot follow (attention heads, a Reshape or
# Split to fixed widths, a weight shared by several nodes), and what the pruned module then raises on a forward.
_UNPRUNABLE = (RuntimeError, IndexError, ValueError, KeyError, TypeError, AssertionError, EngineError)


def _step_imported(pruner: tp.pruner.BasePruner, model: OnnxModule, shape: Sequence[int], classes: int) -> None:
    """Torch-Pruning's step on an imported graph, which must still run and give one row of logits per example."""
    try:
        pruner.step()
        with torch.no_grad():
            device = next(model.parameters()).device
            logits = model(torch.zeros(2, *shape, device=device))
    except _UNPRUNABLE as error:
        raise EngineError(
            "channel pruning cannot remove channels from this imported graph consistently (Torch-Pruning on the "
            f"converted module: {type(error).__name__}: {str(error)[:300]}); use magnitude or random pruning, "
            "or ignored_layers for the layers whose channels are coupled through such ops"
        ) from None
    if tuple(logits.shape) != (2, classes):
        raise EngineError(
            f"channel pruning changed what this imported graph computes: its logits have shape "
            f"{list(logits.shape)} for 2 examples, not [2, {classes}] (a reshape to fixed widths); use "
            "magnitude or random pruning"
        )


def pruned_architecture(model: nn.Module, spec: Any = None) -> dict[str, Any]:
    """The JSON-able description of `model`'s layer widths over its base `spec` (module docstring)."""
    base = _spec_dict(spec if spec is not None else _spec_of(model))
    return {"version": ARCHITECTURE_VERSION, "base": base, "layers": layer_widths(model)}


def rebuild_structured(spec: Mapping[str, Any], architecture: Mapping[str, Any]) -> nn.Module:
    """`build_model(spec)` with its layers shrunk to `architecture`'s widths, in eval mode; its
    state dict has exactly the shapes of the pruned model's, so that model's weights load strictly.
    The architecture is checked as untrusted input: known layers, the right kind, widths that only
    shrink, and a model that runs."""
    if not isinstance(architecture, Mapping) or not isinstance(architecture.get("layers"), Mapping):
        raise EngineError("a pruned architecture must be an object with a 'layers' object")
    if architecture.get("version", ARCHITECTURE_VERSION) != ARCHITECTURE_VERSION:
        raise EngineError(
            f"pruned architecture version {architecture.get('version')!r} is not supported; "
            f"this server reads version {ARCHITECTURE_VERSION}"
        )
    model = build_model(spec)
    base = _spec_dict(model_spec(model))
    if "base" in architecture and _spec_dict(architecture["base"]) != base:
        raise EngineError(f"the pruned architecture was made from {architecture['base']}, not from {dict(spec)}")
    shrink_layers(model, architecture["layers"], base["name"])
    return model


def multiply_accumulates(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of a dense eval-mode forward of one example (`torch_pruning.utils.count_ops_and_params`;
    unstructured zeros still cost MACs without sparse kernels)."""
    device = next(model.parameters()).device
    was_training = model.training
    macs, _ = tp.utils.count_ops_and_params(model.eval(), torch.zeros(1, *input_shape, device=device))
    model.train(was_training)
    return int(macs)


def model_cost(model: nn.Module, input_shape: Sequence[int]) -> dict[str, Any]:
    """What a model costs for one example of `input_shape` (no batch dimension): parameters, the
    non-zero ones among them, `multiply_accumulates`, and the size of its safetensors file in bytes."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "nonzero_parameters": sum(int(p.count_nonzero()) for p in model.parameters()),
        "macs": multiply_accumulates(model, input_shape),
        "file_bytes": len(safetensors_bytes(state)),
        "input_shape": list(input_shape),
    }


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 1,
    repeats: int = 10,
    warmup: int = 2,
    threads: int | None = None,
) -> float:
    """Median wall-clock seconds of one forward pass of a batch of `batch_size` random examples, in
    eval mode under torch.inference_mode, after `warmup` untimed passes (the model's device; CPU here).
    `threads` sets torch's intra-op threads for the measurement (default: as they are); on a machine
    other processes load, one thread gives far steadier figures than OpenMP threads waiting on each other."""
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise EngineError(
            f"latency needs batch_size ≥ 1, repeats ≥ 1, warmup ≥ 0; got {batch_size}, {repeats}, {warmup}"
        )
    device = next(model.parameters()).device
    inputs = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    was_training, was_threads = model.training, torch.get_num_threads()
    model.eval()
    if threads is not None:
        torch.set_num_threads(threads)
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                started = time.perf_counter()
                model(inputs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - started)
    finally:
        model.train(was_training)
        torch.set_num_threads(was_threads)
    return statistics.median(times)


def compare_models(
    dense: nn.Module,
    pruned: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 10,
    threads: int | None = None,
) -> dict[str, Any]:
    """Cost of the dense and the pruned model side by side, and their latencies at each batch size
    measured in alternating rounds in this process (so drift in the machine's speed hits both), with
    ratios dense/pruned (> 1: the pruned model is smaller or faster)."""
    report: dict[str, Any] = {"dense": model_cost(dense, input_shape), "pruned": model_cost(pruned, input_shape)}
    for batch in batch_sizes:
        models = {"dense": dense, "pruned": pruned}
        for model in models.values():  # one untimed warm-up pass each
            measure_latency(model, input_shape, batch, repeats=1, warmup=0, threads=threads)
        rounds: dict[str, list[float]] = {"dense": [], "pruned": []}
        for _ in range(repeats):
            for name, model in models.items():
                rounds[name].append(measure_latency(model, input_shape, batch, repeats=1, warmup=0, threads=threads))
        for name in rounds:
            report[name][f"latency_s_batch_{batch}"] = statistics.median(rounds[name])
    report["threads"] = threads if threads is not None else torch.get_num_threads()
    report["ratios"] = {
        key: report["dense"][key] / report["pruned"][key]
        for key in report["dense"]
        if key != "input_shape" and report["pruned"][key]
    }
    return report


def _floor_safe(ratio: float) -> float:
    """Torch-Pruning keeps int(channels · (1 − ratio)) channels, and 10 · (1 − 0.8) is 1.9999999999999996
    in floating point: a 1e-9 allowance keeps 2, as meant, and changes nothing away from such ties."""
    return max(ratio - 1e-9, 0.0)


def _spec_of(model: nn.Module) -> Any:
    spec = getattr(model, "spec", None)
    if spec is None:
        raise EngineError("structured pruning needs a model built from a registry architecture (build_model)")
    return spec


def _spec_dict(spec: Any) -> dict[str, Any]:
    """The validated spec as JSON with its defaults filled in, so {"name": "resnet20"} equals its dump."""
    try:
        validated = architecture_adapter.validate_python(spec.model_dump() if hasattr(spec, "model_dump") else spec)
    except Exception as error:  # pydantic's ValidationError; its message says which field
        raise EngineError(f"architecture spec is invalid: {error}") from error
    # A re-uploaded pruned model is described over the registry architecture it came from (its
    # layer table lists every layer), so pruning it again never nests "pruned" specs.
    return (validated.base if isinstance(validated, PrunedSpec) else validated).model_dump(mode="json")
