"""What audits of an imported ONNX model add to the common path: the model checked against onnxruntime on the
first rows of the evaluation data (the dense model at the start, and every channel-pruned graph), and each run's
graph written for download — for a channel-pruned run also its architecture, the graph it wrote."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from arch.registry import architecture_adapter, input_shape
from arch.specs import OnnxSpec
from worker.engine.errors import EngineError
from worker.engine.onnx_model import graph_with_weights, pruned_spec
from worker.engine.onnx_reference import Agreement, compare_with_onnxruntime
from worker.inputs import AuditInputs

REFERENCE_ROWS = 64  # the evaluation rows an imported ONNX model is checked on against onnxruntime


def _agreement(inputs: AuditInputs, model: torch.nn.Module, graph: bytes, x) -> Agreement:
    rows = np.asarray(x[:REFERENCE_ROWS], dtype=np.float32).reshape(
        -1, *input_shape(architecture_adapter.validate_python(inputs.architecture))
    )
    return compare_with_onnxruntime(model, graph, rows)


def check_against_reference(inputs: AuditInputs, model: torch.nn.Module, x) -> None:
    """An imported model agrees with onnxruntime on the first rows of the evaluation data, or the audit stops."""
    assert inputs.graph_path is not None, "an imported ONNX model has its stored graph"
    agreement = _agreement(inputs, model, inputs.graph_path.read_bytes(), x)
    if not agreement.agrees:
        raise EngineError(f"the imported ONNX model does not match onnxruntime on this dataset: {agreement.describe()}")


def write_run_graph(
    inputs: AuditInputs, model: torch.nn.Module, recipe: dict, physically_pruned: bool, x, out: Path
) -> dict:
    """The run's graph (`graph_with_weights`) written to `out`; returns the run's recipe, whose architecture is
    that graph's, checked against onnxruntime, where channels were removed."""
    assert inputs.graph_path is not None, "an imported ONNX model has its stored graph"
    graph = graph_with_weights(model, inputs.graph_path.read_bytes())
    out.write_bytes(graph)
    if not physically_pruned:
        return recipe
    agreement = _agreement(inputs, model, graph, x)
    if not agreement.agrees:
        raise EngineError(f"the channel-pruned graph does not match onnxruntime: {agreement.describe()}")
    spec = pruned_spec(OnnxSpec.model_validate(inputs.architecture), model, graph, agreement)
    return {**recipe, "architecture": spec.model_dump(mode="json")}
