"""Import an uploaded ONNX model: validate it as data, convert it, check it against onnxruntime, write its weights.

    python -m worker.import_onnx IN OUT --max-cpu-seconds S --max-output-bytes B

Run by the web process (which imports neither onnx nor torch) as a short-lived child under its own resource
limits, like `worker.convert_checkpoint`. The file is parsed with `onnx.load_model_from_string` (which never
reads external data) and refused when any tensor's data lies outside it (CVE-2022-25882, CVE-2024-27318,
CVE-2024-5187 were path traversals through external data); then size caps, `onnx.checker.check_model(full_check=
True)` (which also refuses cycles: nodes must be topologically sorted), strict shape inference, the op allow-list
(`worker.engine.onnx_graph.unsupported`), a dynamic batch dimension and static other dimensions. Nothing in the
file runs: the graph is converted to torch ops from the allow-list, and onnxruntime (CPU provider, no custom op
libraries) runs the same allow-listed default-domain graph as the reference.

Exits 0 after writing OUT (the weights as safetensors, under the module's parameter names) with one JSON line on
stdout: input_shape, num_classes, opset, ops, parameter_count, prunable_layers, reference; 2 with one JSON line
``{"error": "..."}`` when the file is refused; 3 on MemoryError (worker/child_limits.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from worker.child_limits import Refused, child_main

MAX_NODES = 20_000
MAX_INITIALIZERS = 10_000
MAX_RANK = 8
MAX_TENSOR_ELEMENTS = 1 << 28  # 1 GiB of float32 in one tensor
REFERENCE_ROWS = 4
SELF_CONTAINED_HINT = (
    "export one self-contained file: `torch.onnx.export(model, (x,), 'model.onnx', dynamo=True, "
    "external_data=False, dynamic_shapes=({0: torch.export.Dim('batch')},))`, or re-save an existing model with "
    "`onnx.save_model(onnx.load('model.onnx'), 'single.onnx', save_as_external_data=False)`"
)


def _tensors(model: Any) -> list[tuple[str, Any]]:
    """Every tensor the file holds: initializers and the value attributes of nodes (Constant)."""
    found = [(f"initializer {t.name!r}", t) for t in model.graph.initializer]
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                found.append((f"attribute {attribute.name} of node {node.name or node.op_type!r}", attribute.t))
            found.extend((f"attribute {attribute.name} of node {node.name!r}", t) for t in attribute.tensors)
    return found


def check_data_inside(model: Any) -> None:
    from onnx import TensorProto, helper

    if len(model.graph.node) > MAX_NODES or len(model.graph.initializer) > MAX_INITIALIZERS:
        raise Refused(
            f"the graph has {len(model.graph.node)} nodes and {len(model.graph.initializer)} initializers; "
            f"this server accepts at most {MAX_NODES} and {MAX_INITIALIZERS}"
        )
    if len(model.graph.sparse_initializer):
        raise Refused("the graph holds sparse initializers, which are not supported")
    for where, tensor in _tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise Refused(
                f"{where} keeps its data outside the file (external data at {location!r}); external data is "
                f"never read: {SELF_CONTAINED_HINT}"
            )
        dims = list(tensor.dims)
        if len(dims) > MAX_RANK or any(d < 0 for d in dims):
            raise Refused(f"{where} declares the shape {dims}")
        elements = 1
        for d in dims:
            elements *= d
        if elements > MAX_TENSOR_ELEMENTS:
            raise Refused(f"{where} declares {elements} elements, more than the {MAX_TENSOR_ELEMENTS} allowed")
        if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
            raise Refused(f"{where} has a non-numeric type")
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except KeyError:
            raise Refused(f"{where} has data type {tensor.data_type}, which ONNX does not define") from None
        held = _held_elements(tensor, itemsize)
        if held != elements:
            raise Refused(f"{where} declares {elements} elements ({dims}) but holds {held}")


def _held_elements(tensor: Any, itemsize: int) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data) // itemsize if len(tensor.raw_data) % itemsize == 0 else -1
    fields = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
    return max(len(getattr(tensor, name)) for name in fields)


def parse(data: bytes) -> Any:
    import onnx
    from google.protobuf.message import DecodeError

    if data[:2] == b"PK":
        raise Refused("the file is a zip archive (a PyTorch checkpoint or .npz renamed?), not an ONNX protobuf")
    if data[:1] == b"\x80":
        raise Refused("the file is a pickle, not an ONNX protobuf; pickles are never loaded")
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise Refused(f"the file is not a valid ONNX protobuf (truncated or corrupt: {str(exc)[:200]})") from None
    if not model.graph.node:
        raise Refused("the file parses as protobuf but holds no ONNX graph (no nodes)")
    return model


def check(model: Any) -> Any:
    """check_model(full_check) and strict shape inference; returns the model with inferred shapes."""
    import onnx

    from worker.engine.onnx_allowlist import unsupported

    # Before the checker: it would name a custom domain's op only as "no schema registered".
    reason = unsupported(model)
    if reason is not None:
        raise Refused(reason)
    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    # ValueError: the checker's own for a data type it does not know, and UnicodeDecodeError for a name or
    # string that is not UTF-8.
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:400] or type(exc).__name__
        raise Refused(f"onnx.checker refused the model: {reason}") from None
    return inferred


def _dims(value: Any) -> list[int | str]:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        raise Refused(f"the graph's {value.name!r} has no declared shape")
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]


def io_shapes(model: Any) -> tuple[list[int], int]:
    """The example input shape (without batch) and the number of classes, from the graph's declared shapes."""
    from onnx import TensorProto

    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise Refused(
            f"the graph must have one input and one output; it has {len(inputs)} and {len(model.graph.output)}"
        )
    if inputs[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise Refused("the graph's input must be float32")
    dims, out = _dims(inputs[0]), _dims(model.graph.output[0])
    if not dims or isinstance(dims[0], int):
        raise Refused(
            f"the input's batch dimension is fixed ({dims[:1]}); export with a dynamic batch dimension: "
            "dynamic_shapes=({0: torch.export.Dim('batch')},)"
        )
    dynamic = [(i, d) for i, d in enumerate(dims[1:], start=1) if not isinstance(d, int) or d < 1]
    if dynamic:
        i, d = dynamic[0]
        raise Refused(
            f"input dimension {i} is dynamic ({d!r}); only the batch dimension may be, the others must be fixed"
        )
    if len(out) != 2 or not isinstance(out[1], int) or out[1] < 2:
        raise Refused(f"the output must be [batch, classes] logits with at least 2 classes; it is {out}")
    return [int(d) for d in dims[1:]], int(out[1])


def convert(model: Any, data: bytes, input_shape: list[int], out: str) -> dict[str, Any]:
    import numpy as np
    from safetensors.torch import save_file

    from worker.engine.errors import EngineError
    from worker.engine.onnx_allowlist import opset_of
    from worker.engine.onnx_graph import build_onnx_module
    from worker.engine.onnx_reference import compare_with_onnxruntime
    from worker.engine.pruning import prunable_layers

    try:
        module = build_onnx_module(model)
        x = np.random.default_rng(0).standard_normal((REFERENCE_ROWS, *input_shape)).astype(np.float32)
        agreement = compare_with_onnxruntime(module, data, x)
    except (EngineError, RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise Refused(f"the graph could not be run: {str(exc)[:400]}") from None
    if not agreement.agrees:
        raise Refused(f"the converted model does not match onnxruntime: {agreement.describe()}")
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, out)
    return {
        "opset": opset_of(model),
        "ops": sorted({node.op_type for node in model.graph.node}),
        "parameter_count": sum(p.numel() for p in module.parameters()),
        "prunable_layers": list(prunable_layers(module)),
        "reference": {"max_abs_difference": agreement.max_abs_difference, "tolerance": agreement.allowed},
    }


def import_model(source: str, out: str) -> dict[str, Any]:
    data = Path(source).read_bytes()
    model = parse(data)
    check_data_inside(model)
    inferred = check(model)
    input_shape, num_classes = io_shapes(inferred)
    summary = convert(model, data, input_shape, out)
    return {"input_shape": input_shape, "num_classes": num_classes, **summary}


def main(argv: list[str] | None = None) -> int:
    return child_main("python -m worker.import_onnx", __doc__.split("\n\n")[0], import_model, argv)


if __name__ == "__main__":
    sys.exit(main())
