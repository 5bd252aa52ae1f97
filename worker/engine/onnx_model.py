"""An imported ONNX model on the worker: the module built from its stored graph (checked against the digest its
spec records), and a pruned model written back as ONNX — the original graph with its weight initializers
replaced by the module's tensors (MatMul weights transposed back), loadable by onnxruntime."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from arch.specs import OnnxSpec
from worker.engine.errors import EngineError
from worker.engine.onnx_graph import OnnxModule, build_onnx_module


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


def write_onnx(model: nn.Module, graph_path: Path, out_path: Path) -> None:
    """The graph at `graph_path` with every weight initializer replaced by `model`'s current tensor."""
    if not isinstance(model, OnnxModule):
        raise EngineError("only an imported ONNX model can be written back as ONNX")
    graph = onnx.load_model_from_string(Path(graph_path).read_bytes())
    imported = model.imported
    state = model.state_dict()
    replaced = {}
    for key, name in imported.initializers.items():
        value = state[key].detach().cpu()
        value = value.t() if key in imported.transposed else value
        replaced[name] = np.ascontiguousarray(value.numpy())
    for index, tensor in enumerate(graph.graph.initializer):
        if tensor.name in replaced:
            array = replaced[tensor.name].astype(numpy_helper.to_array(tensor).dtype, copy=False)
            graph.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, tensor.name))
    onnx.save_model(graph, str(out_path), save_as_external_data=False)
