"""The ONNX operators that consume weights (Conv, ConvTranspose, Gemm, MatMul, BatchNormalization,
LayerNormalization) and the pooling ops, as kernels for `worker.engine.onnx_graph`.

A Conv, Gemm/MatMul, BatchNormalization or last-axis LayerNormalization whose weights are initializers used by
that node alone becomes a real module (`nn.Conv*d`, `nn.Linear`, `OnnxBatchNorm`, `OnnxLayerNorm`) placed at the
weight's name (``features.0.weight`` → module ``features.0``), so unstructured pruning, the dense-layer defaults,
MAC counting and Torch-Pruning's channel pruning see the layers they see in a registry model. A MatMul's
``[in, out]`` initializer is held transposed as the Linear's ``[out, in]`` weight (and written back transposed).
Every other weight slot (a shared initializer) becomes a parameter or buffer at its own name, read by a
functional kernel."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from onnx import NodeProto
from torch import nn

from worker.engine.errors import EngineError
from worker.engine.onnx_ops import Inputs, Kernel, OpSupport, attributes

Tensor = torch.Tensor
_CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_TRANSPOSED_FUNCTIONS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_AVG_POOLS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX_POOLS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _explicit_pads(node: NodeProto, attrs: dict[str, Any], spatial: int) -> list[int]:
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise EngineError(
            f"node {node.name or node.op_type}: auto_pad={auto_pad} is not supported (export explicit pads)"
        )
    pads = list(attrs.get("pads", [0] * (2 * spatial)))
    return [0] * (2 * spatial) if auto_pad == "VALID" else pads


def _symmetric(pads: list[int]) -> bool:
    half = len(pads) // 2
    return pads[:half] == pads[half:]


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX [x1_begin, x2_begin, …, x1_end, x2_end, …] as F.pad's last-dimension-first pairs."""
    half = len(pads) // 2
    out: list[int] = []
    for axis in reversed(range(half)):
        out += [pads[axis], pads[axis + half]]
    return out


def _owned(ctx: Any, node: NodeProto, slots: tuple[int, ...]) -> bool:
    """The node's weight inputs at `slots` are initializers this node alone uses (or absent)."""
    for slot in slots:
        if slot < len(node.input) and node.input[slot]:
            name = node.input[slot]
            if not ctx.is_initializer(name) or ctx.uses(name) != 1:
                return False
    return ctx.is_initializer(node.input[slots[0]])


# ---------------------------------------------------------------------------------------------- convolutions


def _conv_factory(node: NodeProto, ctx: Any) -> Kernel:
    attrs = attributes(node)
    weight_name = node.input[1]
    shape = ctx.shape_of(weight_name)
    if shape is None:
        raise EngineError(f"node {node.name or 'Conv'}: the weight's shape is unknown")
    spatial = len(shape) - 2
    if spatial not in _CONV_CLASSES:
        raise EngineError(f"node {node.name or 'Conv'}: {spatial}-D convolutions are not supported")
    pads = _explicit_pads(node, attrs, spatial)
    stride = tuple(attrs.get("strides", [1] * spatial))
    dilation = tuple(attrs.get("dilations", [1] * spatial))
    groups = int(attrs.get("group", 1))
    options: dict[str, Any] = {"stride": stride, "dilation": dilation, "groups": groups}
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if _owned(ctx, node, (1, 2)):
        padding = tuple(pads[:spatial]) if _symmetric(pads) else (0,) * spatial
        conv: Any = _CONV_CLASSES[spatial]  # Conv1d/2d/3d take tuples of their rank
        module = conv(shape[1] * groups, shape[0], tuple(shape[2:]), stride, padding, dilation, groups, has_bias)
        path = ctx.own_module(module, {"weight": weight_name, **({"bias": node.input[2]} if has_bias else {})})
        ctx.conv_node(path)
        return functools.partial(_module_call, path=path, pad=None if _symmetric(pads) else _torch_pad(pads))
    for name in node.input[1:3]:
        if name:
            ctx.parameter(name)
    return functools.partial(_conv, function=spatial, pad=_torch_pad(pads), **options)


def _module_call(root: nn.Module, xs: Inputs, path: str, pad: list[int] | None) -> Tensor:
    x = xs[0]
    if pad is not None:
        x = F.pad(x, pad)
    return root.get_submodule(path)(x)


def _conv(root: nn.Module, xs: Inputs, function: int, pad: list[int], **options: Any) -> Tensor:
    x = F.pad(xs[0], pad) if any(pad) else xs[0]
    return _CONV_FUNCTIONS[function](x, xs[1], xs[2] if len(xs) > 2 else None, **options)


def _conv_transpose_factory(node: NodeProto, ctx: Any) -> Kernel:
    attrs = attributes(node)
    shape = ctx.shape_of(node.input[1])
    if shape is None or len(shape) - 2 not in _TRANSPOSED_FUNCTIONS:
        raise EngineError(f"node {node.name or 'ConvTranspose'}: unsupported weight shape {shape}")
    spatial = len(shape) - 2
    pads = _explicit_pads(node, attrs, spatial)
    if not _symmetric(pads) or "output_shape" in attrs:
        raise EngineError(f"node {node.name or 'ConvTranspose'}: asymmetric pads or output_shape are not supported")
    for name in node.input[1:3]:
        if name:
            ctx.parameter(name)
    return functools.partial(
        _conv_transpose,
        function=spatial,
        stride=tuple(attrs.get("strides", [1] * spatial)),
        padding=tuple(pads[:spatial]),
        output_padding=tuple(attrs.get("output_padding", [0] * spatial)),
        groups=int(attrs.get("group", 1)),
        dilation=tuple(attrs.get("dilations", [1] * spatial)),
    )


def _conv_transpose(root: nn.Module, xs: Inputs, function: int, **options: Any) -> Tensor:
    return _TRANSPOSED_FUNCTIONS[function](xs[0], xs[1], xs[2] if len(xs) > 2 else None, **options)


# ---------------------------------------------------------------------------------------------- dense layers


def _gemm_factory(node: NodeProto, ctx: Any) -> Kernel:
    attrs = attributes(node)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    trans_a, trans_b = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))
    has_bias = len(node.input) > 2 and bool(node.input[2])
    bias_shape = ctx.shape_of(node.input[2]) if has_bias else None
    weight_shape = ctx.shape_of(node.input[1])
    if (
        alpha == 1.0
        and beta == 1.0
        and not trans_a
        and weight_shape is not None
        and len(weight_shape) == 2
        and (bias_shape is None or len(bias_shape) == 1)
        and _owned(ctx, node, (1, 2))
    ):
        return _linear(ctx, node.input[1], node.input[2] if has_bias else None, weight_shape, transposed=not trans_b)
    for name in node.input[1:3]:
        if name and ctx.is_initializer(name):
            ctx.parameter(name)
    return functools.partial(_gemm, alpha=alpha, beta=beta, trans_a=trans_a, trans_b=trans_b)


def _linear(ctx: Any, weight: str, bias: str | None, shape: list[int], transposed: bool) -> Kernel:
    out_features, in_features = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
    module = nn.Linear(in_features, out_features, bias=bias is not None)
    path = ctx.own_module(
        module, {"weight": weight, **({"bias": bias} if bias else {})}, transposed={"weight"} if transposed else set()
    )
    return functools.partial(_module_call, path=path, pad=None)


def _gemm(root: nn.Module, xs: Inputs, alpha: float, beta: float, trans_a: int, trans_b: int) -> Tensor:
    a = xs[0].t() if trans_a else xs[0]
    b = xs[1].t() if trans_b else xs[1]
    out = alpha * (a @ b) if alpha != 1.0 else a @ b
    if len(xs) > 2 and xs[2] is not None:
        out = out + (beta * xs[2] if beta != 1.0 else xs[2])
    return out


def _matmul_factory(node: NodeProto, ctx: Any) -> Kernel:
    shape = ctx.shape_of(node.input[1]) if ctx.is_initializer(node.input[1]) else None
    if shape is not None and len(shape) == 2 and _owned(ctx, node, (1,)):
        return _linear(ctx, node.input[1], None, shape, transposed=True)
    for name in node.input[:2]:
        if ctx.is_initializer(name):
            ctx.parameter(name)
    return _matmul


def _matmul(root: nn.Module, xs: Inputs) -> Tensor:
    return torch.matmul(xs[0], xs[1])


# ---------------------------------------------------------------------------------------------- normalisation


class OnnxBatchNorm(nn.modules.batchnorm._BatchNorm):
    """An inference BatchNormalization over axis 1 of an input of any rank (nn.BatchNorm1d/2d/3d each demand
    one), a `_BatchNorm` so that Torch-Pruning prunes its statistics with the channels it normalises. ONNX keeps
    no batch counter: the module has none (its state dict holds exactly the node's four initializers)."""

    def __init__(self, num_features: int, eps: float, momentum: float) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.register_buffer("num_batches_tracked", None)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"BatchNormalization expects an input of rank 2 or more, not {input.dim()}")

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # nn.Module's: _NormBase's adds a batch counter to a state dict without a version (a safetensors file's).
        nn.Module._load_from_state_dict(self, *args, **kwargs)


def _batch_norm_factory(node: NodeProto, ctx: Any) -> Kernel:
    attrs = attributes(node)
    if int(attrs.get("training_mode", 0)) or len(node.output) > 1:
        raise EngineError(
            f"node {node.name or 'BatchNormalization'}: a training-mode BatchNormalization is not supported"
        )
    for slot, name in enumerate(node.input[1:5], start=1):
        if not ctx.is_initializer(name):
            raise EngineError(f"node {node.name or 'BatchNormalization'}: input {slot} must be an initializer")
    # ONNX's momentum weighs the running value (0.9); torch's weighs the batch (0.1).
    epsilon, momentum = float(attrs.get("epsilon", 1e-5)), 1.0 - float(attrs.get("momentum", 0.9))
    scale_shape = ctx.shape_of(node.input[1])
    if _owned(ctx, node, (1, 2, 3, 4)) and scale_shape is not None and len(scale_shape) == 1:
        tensors = dict(zip(("weight", "bias", "running_mean", "running_var"), node.input[1:5], strict=True))
        path = ctx.own_module(OnnxBatchNorm(scale_shape[0], epsilon, momentum), tensors)
        return functools.partial(_module_call, path=path, pad=None)
    for slot, name in enumerate(node.input[1:5], start=1):
        ctx.parameter(name) if slot <= 2 else ctx.buffer(name)
    return functools.partial(_batch_norm, epsilon=epsilon, momentum=momentum)


def _batch_norm(root: nn.Module, xs: Inputs, epsilon: float, momentum: float) -> Tensor:
    x, scale, bias, mean, var = xs[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=root.training, momentum=momentum, eps=epsilon)


class OnnxLayerNorm(nn.LayerNorm):
    """A LayerNormalization over the last axis, an `nn.LayerNorm` so that Torch-Pruning prunes its scale and bias
    with the channels it normalises, computed by `_normalise`."""

    def forward(self, input: Tensor) -> Tensor:
        return _normalise(input, -1, self.eps, self.weight, self.bias)


def _layer_norm_factory(node: NodeProto, ctx: Any) -> Kernel:
    attrs = attributes(node)
    if len([o for o in node.output if o]) > 1:
        raise EngineError(f"node {node.name or 'LayerNormalization'}: the mean/inv_std outputs are not supported")
    axis, epsilon = int(attrs.get("axis", -1)), float(attrs.get("epsilon", 1e-5))
    has_bias = len(node.input) > 2 and bool(node.input[2])
    scale_shape = ctx.shape_of(node.input[1])
    if axis == -1 and scale_shape is not None and len(scale_shape) == 1 and _owned(ctx, node, (1, 2)):
        module = OnnxLayerNorm(scale_shape[0], eps=epsilon, bias=has_bias)
        path = ctx.own_module(module, {"weight": node.input[1], **({"bias": node.input[2]} if has_bias else {})})
        return functools.partial(_module_call, path=path, pad=None)
    for name in node.input[1:3]:
        if name and ctx.is_initializer(name):
            ctx.parameter(name)
    return functools.partial(_layer_norm, axis=axis, epsilon=epsilon)


def _layer_norm(root: nn.Module, xs: Inputs, axis: int, epsilon: float) -> Tensor:
    return _normalise(xs[0], axis, epsilon, xs[1], xs[2] if len(xs) > 2 else None)


def _normalise(x: Tensor, axis: int, epsilon: float, scale: Tensor | None, bias: Tensor | None) -> Tensor:
    """Written out in primitives: torch 2.13's F.layer_norm gives wrong second derivatives under nested
    forward-mode AD (a jvp of a jvp, which the directional diagnostics take); these are exact."""
    dims = tuple(range(axis % x.dim(), x.dim()))
    centred = x - x.mean(dims, keepdim=True)
    out = centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + epsilon)
    if scale is not None:
        out = out * scale
    if bias is not None:
        out = out + bias
    return out


# ---------------------------------------------------------------------------------------------- pooling


def _global_pool(root: nn.Module, xs: Inputs, kind: str) -> Tensor:
    dims = tuple(range(2, xs[0].dim()))
    return xs[0].mean(dims, keepdim=True) if kind == "avg" else xs[0].amax(dims, keepdim=True)


def _pool_factory(kind: str):
    def factory(node: NodeProto, ctx: Any) -> Kernel:
        attrs = attributes(node)
        kernel = list(attrs["kernel_shape"])
        spatial = len(kernel)
        pads = _explicit_pads(node, attrs, spatial)
        if len([o for o in node.output if o]) > 1:
            raise EngineError(f"node {node.name or 'MaxPool'}: the Indices output is not supported")
        if any(d != 1 for d in attrs.get("dilations", [1] * spatial)) and kind == "avg":
            raise EngineError(f"node {node.name or 'AveragePool'}: dilations are not supported")
        return functools.partial(
            _pool,
            kind=kind,
            kernel=tuple(kernel),
            stride=tuple(attrs.get("strides", [1] * spatial)),
            pad=_torch_pad(pads),
            symmetric=tuple(pads[:spatial])
            if _symmetric(pads) and all(p * 2 <= k for p, k in zip(pads, kernel, strict=False))
            else None,
            ceil_mode=bool(attrs.get("ceil_mode", 0)),
            count_include_pad=bool(attrs.get("count_include_pad", 0)),
            dilation=tuple(attrs.get("dilations", [1] * spatial)),
        )

    return factory


def _pool(
    root: nn.Module, xs: Inputs, kind: str, kernel, stride, pad, symmetric, ceil_mode, count_include_pad, dilation
):
    x = xs[0]
    spatial = len(kernel)
    if symmetric is None:  # asymmetric pads: pad explicitly (−inf for max, zeros counted for average)
        x = F.pad(x, pad, value=float("-inf") if kind == "max" else 0.0)
        symmetric = (0,) * spatial
    if kind == "max":
        return _MAX_POOLS[spatial](x, kernel, stride, symmetric, dilation, ceil_mode=ceil_mode)
    return _AVG_POOLS[spatial](x, kernel, stride, symmetric, ceil_mode=ceil_mode, count_include_pad=count_include_pad)


LAYER_OPS: dict[str, OpSupport] = {
    "Conv": OpSupport(_conv_factory),
    "ConvTranspose": OpSupport(_conv_transpose_factory),
    "Gemm": OpSupport(_gemm_factory),
    "MatMul": OpSupport(_matmul_factory),
    "BatchNormalization": OpSupport(_batch_norm_factory),
    "LayerNormalization": OpSupport(_layer_norm_factory),
    "GlobalAveragePool": OpSupport(lambda node, ctx: functools.partial(_global_pool, kind="avg")),
    "GlobalMaxPool": OpSupport(lambda node, ctx: functools.partial(_global_pool, kind="max")),
    "AveragePool": OpSupport(_pool_factory("avg")),
    "MaxPool": OpSupport(_pool_factory("max")),
}
