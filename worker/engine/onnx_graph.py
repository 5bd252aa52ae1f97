"""An ONNX graph as an `nn.Module` that runs its nodes in topological order with torch ops (the kernels of
`worker.engine.onnx_ops` and `worker.engine.onnx_layers`, looked up in `OPS` by op type).

Initializers in weight slots become named parameters (BatchNorm statistics: buffers) under their graph names, so
``features.0.weight`` is the parameter ``features.0.weight`` of the module (names are sanitised where torch
forbids a character; `ImportedGraph.sources` maps every state-dict key back to its initializer). Every other
initializer, and every Constant node, is a constant: a non-persistent buffer, moved with the module but not in
its state dict. The module reads its tensors by name on each call, so `torch.func.functional_call`, deep copies
and `load_state_dict` all see the current values."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper
from torch import nn

from worker.engine.errors import EngineError
from worker.engine.onnx_allowlist import unsupported
from worker.engine.onnx_layers import LAYER_OPS
from worker.engine.onnx_ops import ELEMENTWISE_OPS, SHAPE_OPS, Kernel, OpSupport
from worker.engine.onnx_reshape import RESHAPE_OPS, Dim, MergeSite


def _no_kernel(node: NodeProto, ctx: Any) -> Kernel:
    raise AssertionError("a Constant node becomes a constant tensor, not a step")  # build_onnx_module sees to it


# The converters by op type; `worker.engine.onnx_allowlist.SUPPORTED_OPS` names the same ops with their opsets.
OPS: dict[str, OpSupport] = {
    **ELEMENTWISE_OPS,
    **SHAPE_OPS,
    **RESHAPE_OPS,
    **LAYER_OPS,
    "Constant": OpSupport(_no_kernel),
}
CONSTANTS = "onnx_constants"  # the container module of the constants (non-persistent buffers)
ACTIVATIONS = "onnx_activations"  # the container of the activation modules


@dataclass(frozen=True)
class Step:
    kernel: Kernel
    inputs: tuple[str, ...]  # "" for an omitted optional input
    outputs: tuple[str, ...]
    release: tuple[str, ...]  # values no later step reads: dropped after this one


@dataclass
class ImportedGraph:
    """What the module runs: its steps, where each graph value comes from, and what maps back to the graph."""

    input_name: str
    output_name: str
    steps: list[Step] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # graph value → state key of the tensor that holds it
    initializers: dict[str, str] = field(default_factory=dict)  # state key (parameter/buffer) → initializer
    transposed: set[str] = field(default_factory=set)  # state keys held transposed (MatMul weights as Linear)
    # What a pruned graph rewrites: the Conv node of each conv module (its `group`), the merge-only Reshapes.
    conv_nodes: dict[str, int] = field(default_factory=dict)
    merges: list[MergeSite] = field(default_factory=list)


def _part(text: str) -> str:
    part = re.sub(r"[^0-9A-Za-z_]", "_", text) or "_"
    return f"p_{part}" if hasattr(nn.Module, part) or part in ("training", CONSTANTS, ACTIVATIONS) else part


class OnnxModule(nn.Module):
    """The imported graph; `forward(x)` takes the graph's one input (batch first) and returns its one output."""

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["graph"] = None  # an ImportedGraph; plain data, copied with the module

    @property
    def imported(self) -> ImportedGraph:
        graph: ImportedGraph = self.__dict__["graph"]
        return graph

    def tensor(self, key: str) -> torch.Tensor:
        path, _, name = key.rpartition(".")
        value = getattr(self.get_submodule(path), name)
        assert isinstance(value, torch.Tensor), key
        return value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, {})

    def value_shapes(self, x: torch.Tensor, names: list[str]) -> dict[str, list[int]]:
        """The shapes the graph values `names` take in a forward of `x` (no gradients)."""
        shapes: dict[str, list[int]] = dict.fromkeys(names, [])
        with torch.no_grad():
            self._run(x, shapes)
        return shapes

    def _run(self, x: torch.Tensor, shapes: dict[str, list[int]]) -> torch.Tensor:
        graph = self.imported
        values: dict[str, Any] = {graph.input_name: x}
        if graph.input_name in shapes:
            shapes[graph.input_name] = list(x.shape)
        for name, key in graph.sources.items():
            values[name] = self.tensor(key)
        for step in graph.steps:
            out = step.kernel(self, [values[name] if name else None for name in step.inputs])
            outputs = out if isinstance(out, tuple) else (out,)
            for name, value in zip(step.outputs, outputs, strict=False):
                values[name] = value
                if name in shapes:
                    shapes[name] = list(value.shape)
            for name in step.release:
                values.pop(name, None)
        return values[graph.output_name]


class _Builder:
    """The context kernel factories see: initializers, their uses, and where their tensors go in the module."""

    def __init__(self, model: ModelProto) -> None:
        graph = model.graph
        self.shapes = _inferred_shapes(model)
        self.constant_values: dict[str, torch.Tensor] = {}
        self.node_index = 0
        self.root = OnnxModule()
        self.arrays: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.use_counts = Counter(name for node in graph.node for name in node.input if name)
        self.use_counts.update(o.name for o in graph.output)
        inputs = [i.name for i in graph.input if i.name not in self.arrays]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise EngineError(
                f"the graph must have one input and one output; it has {len(inputs)} and {len(graph.output)}"
            )
        self.graph = ImportedGraph(inputs[0], graph.output[0].name)
        self.claimed: set[str] = set()
        self.constants = nn.Module()
        self.activations = nn.Module()

    def is_initializer(self, name: str) -> bool:
        return name in self.arrays

    def uses(self, name: str) -> int:
        return self.use_counts[name]

    def shape_of(self, name: str) -> list[int] | None:
        return list(self.arrays[name].shape) if name in self.arrays else None

    def inferred_shape(self, name: str) -> list[Dim] | None:
        return self.shapes.get(name)

    def constant_ints(self, name: str) -> list[int] | None:
        """The values of an integer initializer or Constant output, else None."""
        value = self.constant_values.get(name)
        if value is None and name in self.arrays:
            value = self._torch(name)
        if value is None or value.is_floating_point() or value.dim() > 1:
            return None
        return [int(v) for v in value.reshape(-1).tolist()]

    def merge_site(self, site: MergeSite) -> None:
        self.graph.merges.append(site)

    def conv_node(self, path: str) -> None:
        self.graph.conv_nodes[path] = self.node_index

    def array_of(self, tensor: TensorProto) -> np.ndarray:
        return numpy_helper.to_array(tensor)

    def _torch(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(self.arrays[name], copy=True))

    def _container(self, parts: list[str]) -> nn.Module:
        """The module at `parts` under the root, made of empty modules where missing."""
        module: nn.Module = self.root
        for part in parts:
            child = module._modules.get(part)
            if child is None:
                child = nn.Module()
                module.add_module(part, child)
            module = child
        return module

    def _place(self, name: str, value: torch.Tensor, kind: str) -> str:
        parts = [_part(p) for p in name.split(".")]
        module = self._container(parts[:-1])
        leaf = parts[-1]
        if leaf in module._modules or leaf in module._parameters or leaf in module._buffers:
            leaf, module = "onnx_" + _part(name), self.root  # a clash of sanitised names: a flat name instead
        if kind == "parameter":
            module.register_parameter(
                leaf,
                nn.Parameter(
                    value.float() if value.is_floating_point() else value, requires_grad=value.is_floating_point()
                ),
            )
        else:
            module.register_buffer(leaf, value)
        return ".".join([*parts[:-1], leaf]) if module is not self.root else leaf

    def _claim(self, name: str, kind: str) -> None:
        if name in self.claimed:
            return
        self.claimed.add(name)
        key = self._place(name, self._torch(name), kind)
        self.graph.sources[name] = key
        self.graph.initializers[key] = name

    def parameter(self, name: str) -> None:
        self._claim(name, "parameter")

    def buffer(self, name: str) -> None:
        self._claim(name, "buffer")

    def own_module(self, module: nn.Module, tensors: dict[str, str], transposed: set[str] | None = None) -> str:
        """Place `module` at its weight's name, its tensors filled from the initializers; the module path."""
        weight = tensors["weight"]
        base = weight.removesuffix(".weight") if weight.endswith(".weight") else weight
        parts = [_part(p) for p in base.split(".")]
        parent = self._container(parts[:-1])
        leaf = parts[-1]
        if leaf in parent._modules or leaf in parent._parameters or leaf in parent._buffers:
            parent, parts = self.root, ["onnx_" + _part(base)]
            leaf = parts[0]
        parent.add_module(leaf, module)
        path = ".".join(parts)
        for attr, name in tensors.items():
            value = self._torch(name)
            value = value.t() if transposed and attr in transposed else value
            getattr(module, attr).data = value.float().contiguous()
            self.claimed.add(name)
            self.graph.initializers[f"{path}.{attr}"] = name
            if transposed and attr in transposed:
                self.graph.transposed.add(f"{path}.{attr}")
        return path

    def activation(self, module: nn.Module) -> str:
        """A parameter-free activation module (nn.ReLU): a module, so MAC counters count it as in registry models."""
        key = f"a{len(self.activations._modules)}"
        self.activations.add_module(key, module)
        return f"{ACTIVATIONS}.{key}"

    def constant(self, name: str, value: torch.Tensor) -> None:
        self.constant_values[name] = value
        key = f"c{len(self.constants._buffers)}"
        self.constants.register_buffer(key, value, persistent=False)
        self.graph.sources[name] = f"{CONSTANTS}.{key}"


def build_onnx_module(model: ModelProto) -> OnnxModule:
    """The module for a checked graph (see `unsupported`); raises EngineError for what it cannot run."""
    reason = unsupported(model)
    if reason is not None:
        raise EngineError(reason)
    builder = _Builder(model)
    nodes = list(model.graph.node)
    kernels: list[tuple[NodeProto, Kernel]] = []
    for index, node in enumerate(nodes):
        builder.node_index = index
        if node.op_type == "Constant":
            builder.constant(node.output[0], _constant_value(node))
            continue
        try:
            kernels.append((node, OPS[node.op_type].factory(node, builder)))
        except (KeyError, ValueError, TypeError) as error:
            raise EngineError(
                f"node {node.name or node.op_type} ({node.op_type}) cannot be converted: {error}"
            ) from error
    for name in builder.arrays:
        if name not in builder.claimed:
            builder.constant(name, builder._torch(name))
    builder.root.add_module(CONSTANTS, builder.constants)
    if builder.activations._modules:
        builder.root.add_module(ACTIVATIONS, builder.activations)
    owned = builder.claimed - builder.graph.sources.keys()  # read by their layer module, not passed in
    builder.graph.steps = _steps(kernels, builder.graph.output_name, owned)
    builder.root.__dict__["graph"] = builder.graph
    return builder.root.eval()


def _inferred_shapes(model: ModelProto) -> dict[str, list[Dim]]:
    """Every value's shape by ONNX shape inference: sizes, symbols (the batch) and None where unknown."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[Dim]] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
            ]
    return shapes


def _constant_value(node: NodeProto) -> torch.Tensor:
    attrs = {a.name: a for a in node.attribute}
    if "value" in attrs:
        return torch.from_numpy(np.array(numpy_helper.to_array(attrs["value"].t), copy=True))
    for name, dtype in (
        ("value_float", np.float32),
        ("value_floats", np.float32),
        ("value_int", np.int64),
        ("value_ints", np.int64),
    ):
        if name in attrs:
            return torch.from_numpy(np.array(helper.get_attribute_value(attrs[name]), dtype=dtype))
    raise EngineError(f"Constant node {node.name!r}: only value, value_float(s) and value_int(s) are supported")


def _steps(kernels: list[tuple[NodeProto, Kernel]], output: str, owned: set[str]) -> list[Step]:
    inputs = [tuple("" if name in owned else name for name in node.input) for node, _ in kernels]
    last_use: dict[str, int] = {}
    for index, names in enumerate(inputs):
        for name in names:
            if name:
                last_use[name] = index
    released: dict[int, list[str]] = {}
    for name, index in last_use.items():
        if name != output:
            released.setdefault(index, []).append(name)
    return [
        Step(kernel, inputs[index], tuple(node.output), tuple(released.get(index, ())))
        for index, (node, kernel) in enumerate(kernels)
    ]
