"""The ONNX operators the importer runs without weights of their own, as torch code: a registry from op type to
a kernel factory and the opset range it is written for (`OPS`, with the layer ops of `worker.engine.onnx_layers`
added there). Every kernel is a module-level function `kernel(root, inputs, **attributes) -> outputs` bound with
`functools.partial`, so a converted module deep-copies and pickles as data; every float path is plain torch
autograd (twice differentiable, and fine under `torch.func.jvp` and `vmap`).

Shape-computing chains (Shape → Gather → Concat → Reshape) run on int64 tensors read back with `.tolist()`, so a
dynamic batch dimension flows through them on every call."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from onnx import NodeProto, helper

from worker.engine.errors import EngineError

Tensor = torch.Tensor
Inputs = Sequence[Any]  # a tensor per node input, None where an optional input is omitted
Kernel = Callable[[Any, Inputs], Tensor | tuple[Tensor, ...]]


@dataclass(frozen=True)
class OpSupport:
    """A kernel factory: (node, build context) → kernel (the opsets each op is read at are in
    `worker.engine.onnx_allowlist`)."""

    factory: Callable[[NodeProto, Any], Kernel]


def attributes(node: NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _ints(value: Tensor | None) -> list[int]:
    return [] if value is None else [int(v) for v in value.reshape(-1).tolist()]


# ---------------------------------------------------------------------------------------------- elementwise


def _unary(function: Callable[[Tensor], Tensor]) -> OpSupport:
    def kernel(_root, xs: Inputs, function=function) -> Tensor:
        return function(xs[0])

    return OpSupport(lambda node, ctx: kernel)


def _binary(function: Callable[[Tensor, Tensor], Tensor]) -> OpSupport:
    def kernel(_root, xs: Inputs, function=function) -> Tensor:
        return function(xs[0], xs[1])

    return OpSupport(lambda node, ctx: kernel)


def _divide(a: Tensor, b: Tensor) -> Tensor:
    # ONNX Div on integers truncates (shape arithmetic); on floats it is true division.
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _power(a: Tensor, b: Tensor) -> Tensor:
    return torch.pow(a, b.to(a.dtype) if b.is_floating_point() else b)


def _variadic(function: Callable[[Tensor, Tensor], Tensor]) -> OpSupport:
    def kernel(_root, xs: Inputs, function=function) -> Tensor:
        return functools.reduce(function, [x for x in xs if x is not None])

    return OpSupport(lambda node, ctx: kernel)


def _module(root, xs: Inputs, path: str) -> Tensor:
    return root.get_submodule(path)(xs[0])


def _hard_sigmoid(_root, xs: Inputs, alpha: float, beta: float) -> Tensor:
    return torch.clamp(xs[0] * alpha + beta, 0.0, 1.0)


def _hard_swish(_root, xs: Inputs) -> Tensor:
    return xs[0] * torch.clamp(xs[0] / 6.0 + 0.5, 0.0, 1.0)


def _leaky_relu(_root, xs: Inputs, alpha: float) -> Tensor:
    return F.leaky_relu(xs[0], alpha)


def _gelu(_root, xs: Inputs, approximate: str) -> Tensor:
    return F.gelu(xs[0], approximate=approximate)


def _softmax(_root, xs: Inputs, axis: int, log: bool) -> Tensor:
    return F.log_softmax(xs[0], axis) if log else F.softmax(xs[0], axis)


def _clip(_root, xs: Inputs) -> Tensor:
    low = xs[1] if len(xs) > 1 else None
    high = xs[2] if len(xs) > 2 else None
    return torch.clamp(xs[0], min=low, max=high)


def _where(_root, xs: Inputs) -> Tensor:
    return torch.where(xs[0].bool(), xs[1], xs[2])


_ONNX_DTYPES = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}


def torch_dtype(onnx_type: int) -> torch.dtype:
    if onnx_type not in _ONNX_DTYPES:
        raise EngineError(f"ONNX tensor type {onnx_type} is not supported")
    return _ONNX_DTYPES[onnx_type]


def _cast(_root, xs: Inputs, dtype: torch.dtype) -> Tensor:
    return xs[0].to(dtype)


def _cast_like(_root, xs: Inputs) -> Tensor:
    return xs[0].to(xs[1].dtype)


# ---------------------------------------------------------------------------------------------- shapes


def _shape(_root, xs: Inputs, start: int, end: int | None) -> Tensor:
    return torch.tensor(list(xs[0].shape)[start:end], dtype=torch.int64)


def reshape(_root, xs: Inputs, allowzero: int) -> Tensor:
    data, target = xs[0], _ints(xs[1])
    if not allowzero:  # 0 copies the input's dimension; with allowzero it is a zero-size dimension
        target = [data.shape[i] if size == 0 else size for i, size in enumerate(target)]
    return data.reshape(target)


def _transpose(_root, xs: Inputs, perm: list[int] | None) -> Tensor:
    order = perm if perm is not None else list(reversed(range(xs[0].dim())))
    return xs[0].permute(order)


def _flatten(_root, xs: Inputs, axis: int) -> Tensor:
    x = xs[0]
    axis = axis % x.dim() if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


def _axes(xs: Inputs, attrs_axes: list[int] | None) -> list[int] | None:
    if attrs_axes is not None:
        return list(attrs_axes)
    return _ints(xs[1]) if len(xs) > 1 and xs[1] is not None else None


def _squeeze(_root, xs: Inputs, axes: list[int] | None) -> Tensor:
    chosen = _axes(xs, axes)
    if chosen is None:
        return xs[0].squeeze()
    return xs[0].squeeze(tuple(a % xs[0].dim() for a in chosen))


def _unsqueeze(_root, xs: Inputs, axes: list[int] | None) -> Tensor:
    chosen = _axes(xs, axes) or []
    out = xs[0]
    rank = out.dim() + len(chosen)
    for axis in sorted(a % rank for a in chosen):
        out = out.unsqueeze(axis)
    return out


def _concat(_root, xs: Inputs, axis: int) -> Tensor:
    return torch.cat([x for x in xs if x is not None], axis)


def _gather(_root, xs: Inputs, axis: int) -> Tensor:
    data, indices = xs[0], xs[1].long()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    return data.index_select(axis, indices.reshape(-1)).reshape(
        *data.shape[: axis % data.dim()], *indices.shape, *data.shape[axis % data.dim() + 1 :]
    )


def _slice(_root, xs: Inputs) -> Tensor:
    data = xs[0]
    starts, ends = _ints(xs[1]), _ints(xs[2])
    axes = _ints(xs[3]) if len(xs) > 3 and xs[3] is not None else list(range(len(starts)))
    steps = _ints(xs[4]) if len(xs) > 4 and xs[4] is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * data.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        size = data.shape[axis]
        if step > 0:
            index[axis % data.dim()] = slice(*slice(start, end, step).indices(size))
        else:  # torch slices forward only: take the forward range, then flip it
            first, stop, _ = slice(start, end, step).indices(size)
            count = len(range(first, stop, step))
            index[axis % data.dim()] = slice(first - (count - 1) * -step, first + 1, -step)
            flips.append(axis % data.dim())
    out = data[tuple(index)]
    return out.flip(flips) if flips else out


def _split(_root, xs: Inputs, axis: int, split: list[int] | None, num_outputs: int | None, outputs: int):
    x = xs[0]
    sizes = split if split is not None else (_ints(xs[1]) if len(xs) > 1 and xs[1] is not None else None)
    if sizes is None:
        parts = num_outputs or outputs
        chunk = -(-x.shape[axis] // parts)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(parts)]
    return tuple(torch.split(x, sizes, axis))


def _expand(_root, xs: Inputs) -> Tensor:
    target = _ints(xs[1])
    rank = max(len(target), xs[0].dim())
    own = [1] * (rank - xs[0].dim()) + list(xs[0].shape)
    target = [1] * (rank - len(target)) + target
    return xs[0].expand([max(a, b) if b != 1 else a for a, b in zip(own, target, strict=True)])


def _tile(_root, xs: Inputs) -> Tensor:
    return xs[0].repeat(_ints(xs[1]))


def _constant_of_shape(_root, xs: Inputs, value: np.ndarray) -> Tensor:
    filled = torch.from_numpy(np.array(value).reshape(-1)[:1].copy())
    return filled.expand(_ints(xs[0])).clone()


def _range(_root, xs: Inputs) -> Tensor:
    start, limit, delta = (x.item() for x in xs[:3])
    return torch.arange(start, limit, delta, dtype=xs[0].dtype)


def _identity(_root, xs: Inputs) -> Tensor:
    return xs[0]


def _reduce(function: str) -> OpSupport:
    def factory(node: NodeProto, ctx) -> Kernel:
        attrs = attributes(node)
        return functools.partial(
            _reduce_kernel,
            function=function,
            axes=attrs.get("axes"),
            keepdims=bool(attrs.get("keepdims", 1)),
            noop=bool(attrs.get("noop_with_empty_axes", 0)),
        )

    return OpSupport(factory)


def _reduce_kernel(_root, xs: Inputs, function: str, axes, keepdims: bool, noop: bool) -> Tensor:
    x = xs[0]
    chosen = _axes(xs, axes)
    if not chosen:
        if noop:
            return x
        chosen = list(range(x.dim()))
    dims = tuple(a % x.dim() for a in chosen)
    if function == "mean":
        return x.mean(dims, keepdim=keepdims)
    if function == "sum":
        return x.sum(dims, keepdim=keepdims)
    return x.amax(dims, keepdim=keepdims)


def _with(kernel: Callable[..., Any], **defaults: Any) -> OpSupport:
    """A kernel whose keyword arguments are the node's attributes (with these defaults)."""

    def factory(node: NodeProto, ctx) -> Kernel:
        attrs = attributes(node)
        return functools.partial(kernel, **{name: attrs.get(name, value) for name, value in defaults.items()})

    return OpSupport(factory)


def _cast_factory(node: NodeProto, ctx) -> Kernel:
    return functools.partial(_cast, dtype=torch_dtype(attributes(node)["to"]))


def _split_factory(node: NodeProto, ctx) -> Kernel:
    attrs = attributes(node)
    return functools.partial(
        _split,
        axis=attrs.get("axis", 0),
        split=attrs.get("split"),
        num_outputs=attrs.get("num_outputs"),
        outputs=len(node.output),
    )


def _softmax_factory(log: bool) -> OpSupport:
    return OpSupport(lambda node, ctx: functools.partial(_softmax, axis=attributes(node).get("axis", -1), log=log))


def _constant_of_shape_factory(node: NodeProto, ctx) -> Kernel:
    value = attributes(node).get("value")
    array = np.zeros(1, dtype=np.float32) if value is None else ctx.array_of(value)
    return functools.partial(_constant_of_shape, value=array)


ELEMENTWISE_OPS: dict[str, OpSupport] = {
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_divide),
    "Pow": _binary(_power),
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "Greater": _binary(torch.gt),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Not": _unary(torch.logical_not),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Erf": _unary(torch.erf),
    "Tanh": _unary(torch.tanh),
    "Sigmoid": _unary(torch.sigmoid),
    "Relu": OpSupport(lambda node, ctx: functools.partial(_module, path=ctx.activation(torch.nn.ReLU()))),
    "Softplus": _unary(F.softplus),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "LeakyRelu": _with(_leaky_relu, alpha=0.01),
    "HardSigmoid": _with(_hard_sigmoid, alpha=0.2, beta=0.5),
    "HardSwish": OpSupport(lambda node, ctx: _hard_swish),
    "Gelu": OpSupport(
        lambda node, ctx: functools.partial(_gelu, approximate=attributes(node).get("approximate", "none"))
    ),
    "Softmax": _softmax_factory(log=False),
    "LogSoftmax": _softmax_factory(log=True),
    "Clip": OpSupport(lambda node, ctx: _clip),
    "Where": OpSupport(lambda node, ctx: _where),
    "Cast": OpSupport(_cast_factory),
    "CastLike": OpSupport(lambda node, ctx: _cast_like),
    "Identity": OpSupport(lambda node, ctx: _identity),
    # Exported in eval mode, a Dropout is the identity (its ratio input is ignored; training_mode must be off).
    "Dropout": OpSupport(lambda node, ctx: _identity),
}

SHAPE_OPS: dict[str, OpSupport] = {
    "Shape": _with(_shape, start=0, end=None),
    "Transpose": _with(_transpose, perm=None),
    "Flatten": _with(_flatten, axis=1),
    "Squeeze": _with(_squeeze, axes=None),
    "Unsqueeze": _with(_unsqueeze, axes=None),
    "Concat": _with(_concat, axis=0),
    "Gather": _with(_gather, axis=0),
    "Slice": OpSupport(lambda node, ctx: _slice),
    "Split": OpSupport(_split_factory),
    "Expand": OpSupport(lambda node, ctx: _expand),
    "Tile": OpSupport(lambda node, ctx: _tile),
    "ConstantOfShape": OpSupport(_constant_of_shape_factory),
    "Range": OpSupport(lambda node, ctx: _range),
    "ReduceMean": _reduce("mean"),
    "ReduceSum": _reduce("sum"),
    "ReduceMax": _reduce("max"),
}
