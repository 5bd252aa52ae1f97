"""Which ONNX graphs the importer takes, decided from the protobuf alone (no torch, so the upload child refuses a
file before it loads torch): the default domain only, model opsets MIN_OPSET–MAX_OPSET, the ops of
`SUPPORTED_OPS` (each from the opset given, through MAX_OPSET; `worker.engine.onnx_graph.OPS` has a converter for
each), no local functions and no subgraphs (If, Loop and Scan are not supported)."""

from __future__ import annotations

from onnx import AttributeProto, ModelProto

MIN_OPSET, MAX_OPSET = 17, 22  # torch 2.13's exporter writes 17–21 (CNNs asked for 17 come out at 18)
_ALL = MIN_OPSET
SUPPORTED_OPS: dict[str, int] = {
    **dict.fromkeys(
        (
            # elementwise and activations
            "Add",
            "Sub",
            "Mul",
            "Div",
            "Pow",
            "Neg",
            "Abs",
            "Sqrt",
            "Reciprocal",
            "Exp",
            "Log",
            "Erf",
            "Tanh",
            "Sigmoid",
            "Relu",
            "LeakyRelu",
            "HardSigmoid",
            "HardSwish",
            "Softplus",
            "Floor",
            "Ceil",
            "Softmax",
            "LogSoftmax",
            "Clip",
            "Max",
            "Min",
            "Equal",
            "Less",
            "Greater",
            "And",
            "Or",
            "Not",
            "Where",
            "Cast",
            "CastLike",
            "Identity",
            "Dropout",
            "Constant",
            # shapes and reductions
            "Shape",
            "Reshape",
            "Transpose",
            "Flatten",
            "Squeeze",
            "Unsqueeze",
            "Concat",
            "Gather",
            "Slice",
            "Split",
            "Expand",
            "Tile",
            "ConstantOfShape",
            "Range",
            "ReduceMean",
            "ReduceSum",
            "ReduceMax",
            # layers and pooling
            "Conv",
            "ConvTranspose",
            "Gemm",
            "MatMul",
            "BatchNormalization",
            "LayerNormalization",
            "GlobalAveragePool",
            "GlobalMaxPool",
            "AveragePool",
            "MaxPool",
        ),  # fmt: skip
        _ALL,
    ),
    "Gelu": 20,
}


def opset_of(model: ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return versions[0] if versions else 0


def unsupported(model: ModelProto) -> str | None:
    """Why the graph cannot be imported (the first unsupported op, with its node), or None."""
    opset = opset_of(model)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        return f"the model uses opset {opset}; supported are opsets {MIN_OPSET} to {MAX_OPSET}"
    if model.functions:
        return "the model defines local functions; export without them (inline them)"
    for index, node in enumerate(model.graph.node):
        reason = _unsupported_node(node, index, opset)
        if reason:
            return reason
    domains = sorted({o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx")})
    if domains:
        return (
            f"the model imports the operator domain(s) {', '.join(domains)}; only the default ONNX domain is supported"
        )
    return None


def _unsupported_node(node, index: int, opset: int) -> str | None:
    where = f"node {index} ({node.name!r})" if node.name else f"node {index}"
    if node.domain not in ("", "ai.onnx"):
        return f"{where} is {node.op_type} of the custom domain {node.domain!r}; only default-domain ops are supported"
    if node.op_type not in SUPPORTED_OPS:
        supported = ", ".join(sorted(SUPPORTED_OPS))
        return f"{where} is the op {node.op_type}, which the importer does not support (supported: {supported})"
    if SUPPORTED_OPS[node.op_type] > opset:
        return f"{where}: {node.op_type} needs opset {SUPPORTED_OPS[node.op_type]} or later, the model has {opset}"
    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
        return f"{where} ({node.op_type}) holds a subgraph; control flow is not supported"
    return None
