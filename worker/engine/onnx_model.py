"""An imported ONNX model on the worker: the module built from its stored graph (checked against the digest its
spec records), and a pruned model written back as ONNX — the original graph with its weight initializers
replaced by the module's tensors (MatMul weights transposed back), and, where channels were removed, the widths
the graph states rewritten — loadable by onnxruntime."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from arch.specs import OnnxReference, OnnxSpec
from worker.engine.errors import EngineError
from worker.engine.onnx_graph import OnnxModule, build_onnx_module
from worker.engine.onnx_reference import Agreement


def read_graph(spec: OnnxSpec, graph_path: Path) -> bytes:
    try:
        data = Path(graph_path).read_bytes()
    except OSError as error:
        raise EngineError(f"the stored ONNX graph of this model cannot be read: {error}") from error
    if hashlib.sha256(data).hexdigest() != spec.graph_sha256:
        raise EngineError("the stored ONNX graph does not match the digest its model records")
    return data


def build_from_graph(spec: OnnxSpec, graph_path: Path) -> OnnxModule:
    """The module of the stored graph, its weights those of the graph (load_weights overwrites them)."""
    module = build_onnx_module(onnx.load_model_from_string(read_graph(spec, graph_path)))
    return module


def graph_with_weights(model: nn.Module, graph: bytes) -> bytes:
    """`graph` with every weight initializer replaced by `model`'s current tensor. Where channels were removed,
    also each Conv's `group` (a depthwise conv keeps one group per channel) and the merge-only Reshapes' shapes
    (`worker.engine.onnx_reshape`), and without the original's inferred intermediate shapes."""
    if not isinstance(model, OnnxModule):
        raise EngineError("only an imported ONNX model can be written back as ONNX")
    proto = onnx.load_model_from_string(graph)
    imported = model.imported
    state = model.state_dict()
    replaced = {}
    for key, name in imported.initializers.items():
        value = state[key].detach().cpu()
        value = value.t() if key in imported.transposed else value
        replaced[name] = np.ascontiguousarray(value.numpy())
    resized = False
    for index, tensor in enumerate(proto.graph.initializer):
        if tensor.name in replaced:
            original = numpy_helper.to_array(tensor)
            array = replaced[tensor.name].astype(original.dtype, copy=False)
            resized |= array.shape != original.shape
            proto.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, tensor.name))
    if resized:
        _rewrite_widths(model, proto)
    return proto.SerializeToString()


def _rewrite_widths(model: OnnxModule, proto: onnx.ModelProto) -> None:
    imported = model.imported
    nodes = proto.graph.node
    for path, index in imported.conv_nodes.items():
        groups = model.get_submodule(path).groups
        attribute = next((a for a in nodes[index].attribute if a.name == "group"), None)
        if attribute is not None:
            attribute.i = groups
        elif groups != 1:
            nodes[index].attribute.append(helper.make_attribute("group", groups))
    shapes = model.value_shapes(torch.zeros(1, *_input_shape(proto)), [site.data for site in imported.merges])
    for site in imported.merges:
        target = site.target(shapes[site.data])
        if list(site.template) != target:
            node = nodes[site.node_index]
            name = f"{node.input[1]}__pruned_{site.node_index}"
            proto.graph.initializer.append(numpy_helper.from_array(np.array(target, dtype=np.int64), name))
            node.input[1] = name
    used = {name for node in nodes for name in node.input}
    unused = [tensor for tensor in proto.graph.initializer if tensor.name not in used]
    for tensor in unused:  # a shape constant every Reshape now reads a rewritten copy of
        proto.graph.initializer.remove(tensor)
    del proto.graph.value_info[:]


def _input_shape(proto: onnx.ModelProto) -> list[int]:
    initializers = {t.name for t in proto.graph.initializer}
    value = next(i for i in proto.graph.input if i.name not in initializers)
    return [d.dim_value for d in value.type.tensor_type.shape.dim][1:]


def pruned_spec(spec: OnnxSpec, model: nn.Module, graph: bytes, agreement: Agreement) -> OnnxSpec:
    """The spec of a channel-pruned graph written by `graph_with_weights`, checked against onnxruntime."""
    return spec.model_copy(
        update={
            "graph_sha256": hashlib.sha256(graph).hexdigest(),
            "parameter_count": sum(p.numel() for p in model.parameters()),
            "reference": OnnxReference(max_abs_difference=agreement.max_abs_difference, tolerance=agreement.allowed),
        }
    )
