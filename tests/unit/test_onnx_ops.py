"""Every allow-listed op that the exported test models do not use, each in a small hand-built graph (one float input
with a dynamic batch, one float output), run by the converted module and by onnxruntime on the same inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from worker.engine.onnx_graph import build_onnx_module
from worker.engine.onnx_reference import compare_with_onnxruntime

OPSET = 18


def graph(nodes, shape=(6,), initializers=(), out_shape=(6,)) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *shape])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", *out_shape])
    model = helper.make_model(
        helper.make_graph(nodes, "ops", [x], [y], list(initializers)),
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def const(name: str, value) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def node(op: str, inputs: list[str], outputs: list[str], **attrs):
    return helper.make_node(op, inputs, outputs, **attrs)


POSITIVE = [node("Abs", ["x"], ["a"]), node("Add", ["a", "one"], ["p"])]  # |x| + 1: in every op's domain
ONE = const("one", np.float32(1.0))

GRAPHS = {
    **{
        op: graph([*POSITIVE, node(op, ["p"], ["y"])], initializers=[ONE])
        for op in ("Log", "Sqrt", "Reciprocal", "Exp", "Neg", "Softplus", "Ceil", "Floor", "Identity")
    },
    "Sub/Max/Min": graph(
        [
            node("Sub", ["x", "c"], ["s"]),
            node("Max", ["s", "x", "c"], ["m"]),
            node("Min", ["m", "x"], ["y"]),
        ],
        initializers=[const("c", np.linspace(-1, 1, 6, dtype=np.float32))],
    ),
    "Greater/Less/Equal/And/Or/Not/Where/Cast": graph(
        [
            node("Greater", ["x", "lo"], ["above"]),
            node("Less", ["x", "hi"], ["below"]),
            node("Not", ["below"], ["not_below"]),
            node("And", ["above", "not_below"], ["both"]),
            node("Floor", ["x"], ["f"]),
            node("Ceil", ["x"], ["c"]),
            node("Equal", ["f", "c"], ["whole"]),
            node("Or", ["both", "whole"], ["either"]),
            node("Neg", ["x"], ["n"]),
            node("Where", ["either", "x", "n"], ["w"]),
            node("Cast", ["both"], ["both_f"], to=TensorProto.FLOAT),
            node("Add", ["w", "both_f"], ["y"]),
        ],
        initializers=[const("lo", np.float32(-0.5)), const("hi", np.float32(0.5))],
    ),
    "Cast/CastLike/Constant/Dropout": graph(
        [
            node("Constant", [], ["k"], value=const("k", np.full(6, 3.0, dtype=np.float32))),
            node("Mul", ["x", "k"], ["scaled"]),
            node("Cast", ["scaled"], ["ints"], to=TensorProto.INT64),  # truncation toward zero
            node("CastLike", ["ints", "x"], ["back"]),
            node("Dropout", ["back"], ["y"]),
        ]
    ),
    "Flatten": graph([node("Flatten", ["x"], ["y"], axis=1)], shape=(2, 3)),
    "GlobalAveragePool/GlobalMaxPool": graph(
        [
            node("GlobalAveragePool", ["x"], ["avg"]),
            node("GlobalMaxPool", ["x"], ["max"]),
            node("Concat", ["avg", "max"], ["both"], axis=1),
            node("Flatten", ["both"], ["y"], axis=1),
        ],
        shape=(2, 3, 3),
        out_shape=(4,),
    ),
    "ReduceSum/ReduceMax": graph(
        [
            node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
            node("ReduceMax", ["x", "axes"], ["m"], keepdims=0),
            node("Flatten", ["s"], ["sf"], axis=1),
            node("Concat", ["sf", "m"], ["y"], axis=1),
        ],
        shape=(2, 3),
        out_shape=(4,),
        initializers=[const("axes", np.array([2], dtype=np.int64))],
    ),
    "Split": graph(
        [
            node("Split", ["x", "sizes"], ["left", "right"], axis=1),
            node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3),
            node("Mul", ["left", "b"], ["lb"]),
            node("Concat", ["lb", "right", "c", "a"], ["y"], axis=1),
        ],
        out_shape=(10,),
        initializers=[const("sizes", np.array([2, 4], dtype=np.int64))],
    ),
    "Shape/ConstantOfShape/Range/Tile": graph(
        [
            node("Shape", ["x"], ["shape"]),
            node("ConstantOfShape", ["shape"], ["twos"], value=const("v", np.array([2.0], dtype=np.float32))),
            node("Range", ["start", "limit", "delta"], ["steps"]),
            node("Cast", ["steps"], ["steps_f"], to=TensorProto.FLOAT),
            node("Mul", ["x", "twos"], ["doubled"]),
            node("Add", ["doubled", "steps_f"], ["shifted"]),
            node("Tile", ["shifted", "repeats"], ["y"]),
        ],
        out_shape=(12,),
        initializers=[
            const("start", np.int64(0)),
            const("limit", np.int64(6)),
            const("delta", np.int64(1)),
            const("repeats", np.array([1, 2], dtype=np.int64)),
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(GRAPHS))
def test_op_matches_onnxruntime(case):
    data = GRAPHS[case]
    module = build_onnx_module(onnx.load_model_from_string(data))
    shape = [d.dim_value for d in onnx.load_model_from_string(data).graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(0).standard_normal((5, *shape)).astype(np.float32) * 2
    x[0].flat[0] = 1.0  # an integral value: Equal(Floor, Ceil) is true somewhere
    agreement = compare_with_onnxruntime(module, data, x)
    assert agreement.agrees and agreement.max_abs_difference <= 1e-6, agreement.describe()


def test_every_allow_listed_op_is_run_against_onnxruntime_somewhere():
    """The exported test models, the ConvTranspose/AveragePool/LeakyRelu/Sigmoid/LogSoftmax network that
    tests/unit/test_onnx_import.py exports, and the graphs here: an op allow-listed without a test fails this."""
    from tests.onnx_models import MODELS, exported
    from worker.engine.onnx_allowlist import SUPPORTED_OPS

    exported_ops = {
        n.op_type
        for name in MODELS
        for opset in (17, 21)
        for n in onnx.load_model_from_string(exported(name, opset)).graph.node
    }
    here = {n.op_type for data in GRAPHS.values() for n in onnx.load_model_from_string(data).graph.node}
    elsewhere = {"ConvTranspose", "AveragePool", "LeakyRelu", "LogSoftmax", "Sigmoid"}
    assert set(SUPPORTED_OPS) - exported_ops - here - elsewhere == set()
