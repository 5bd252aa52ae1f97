"""Reshape for an imported graph whose channels may be pruned. An exporter writes a flatten as a Reshape to a
constant shape (``[-1, 512]`` before a classifier), which fixes the widths it was exported with. A Reshape whose
shape is a constant and which only merges runs of adjacent input dimensions (every output dimension the product
of consecutive input dimensions, read off the graph's inferred shapes) is run as that merge of whatever widths
its input has, so it still fits after channels were removed; `worker.engine.onnx_model` writes the merged widths
back into the pruned graph. Any other Reshape keeps its constant shape."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from onnx import NodeProto

from worker.engine.onnx_ops import Inputs, Kernel, OpSupport, attributes, reshape

Dim = int | str | None  # an inferred dimension: its size, a symbol (the batch), or unknown


@dataclass(frozen=True)
class MergeSite:
    """A merge-only Reshape: its node, its data input, its constant shape and how many input dimensions each
    output dimension merges."""

    node_index: int
    data: str
    template: tuple[int, ...]
    groups: tuple[int, ...]

    def target(self, input_shape: Sequence[int]) -> list[int]:
        """The shape to write for an input of `input_shape`: the template's -1, and its 0 where it copies the
        same dimension, kept (so the batch stays dynamic); every other entry the product of its group."""
        target: list[int] = []
        start = 0
        for template, size in zip(self.template, self.groups, strict=True):
            copies_same = template == 0 and size == 1 and start == len(target)
            target.append(template if template == -1 or copies_same else math.prod(input_shape[start : start + size]))
            start += size
        return target


def merge_groups(inputs: Sequence[Dim], template: Sequence[int], allowzero: int) -> tuple[int, ...] | None:
    """How many consecutive input dimensions each entry of the constant shape `template` merges, or None when
    the reshape does anything else (splits a dimension, moves one) or a size it needs is unknown. Entries left
    of the -1 are matched from the left, those right of it from the right, and the -1 takes the rest."""
    if None in inputs or template.count(-1) > 1 or (allowzero and 0 in template):
        return None
    wanted: list[Dim] = [inputs[i] if size == 0 and i < len(inputs) else size for i, size in enumerate(template)]
    if 0 in wanted:
        return None
    wildcard = wanted.index(-1) if -1 in wanted else len(wanted)
    left = _match(list(inputs), wanted[:wildcard])
    if left is None:
        return None
    rest = list(inputs)[sum(left) :]
    if wildcard == len(wanted):  # no -1: unit dimensions left over join the last group
        if not left or any(d != 1 for d in rest):
            return None
        return (*left[:-1], left[-1] + len(rest))
    right = _match(rest[::-1], wanted[wildcard + 1 :][::-1])
    if right is None or len(rest) - sum(right) < 1:
        return None
    return (*left, len(rest) - sum(right), *right[::-1])


def _match(inputs: list[Dim], wanted: list[Dim]) -> list[int] | None:
    """Group sizes that make each wanted size from the front of `inputs` (a symbol only from itself)."""
    groups, i = [], 0
    for size in wanted:
        if i < len(inputs) and (isinstance(size, str) or isinstance(inputs[i], str)):
            if inputs[i] != size:
                return None
            groups.append(1)
            i += 1
            continue
        assert isinstance(size, int), "merge_groups takes no unknown sizes"
        taken, product = 0, 1
        while i + taken < len(inputs) and (product < size or taken == 0):
            dim = inputs[i + taken]
            if not isinstance(dim, int):
                break
            product *= dim
            taken += 1
        if product != size:
            return None
        groups.append(taken)
        i += taken
    return groups


def _merged(_root, xs: Inputs, groups: tuple[int, ...]) -> torch.Tensor:
    data, shape, start = xs[0], [], 0
    for size in groups:
        shape.append(math.prod(data.shape[start : start + size]))
        start += size
    return data.reshape(shape)


def _reshape_factory(node: NodeProto, ctx) -> Kernel:
    allowzero = int(attributes(node).get("allowzero", 0))
    template = ctx.constant_ints(node.input[1])
    inputs = ctx.inferred_shape(node.input[0])
    groups = merge_groups(inputs, template, allowzero) if template is not None and inputs is not None else None
    if template is None or groups is None:
        return functools.partial(reshape, allowzero=allowzero)
    ctx.merge_site(MergeSite(ctx.node_index, node.input[0], tuple(template), groups))
    return functools.partial(_merged, groups=groups)


RESHAPE_OPS: dict[str, OpSupport] = {"Reshape": OpSupport(_reshape_factory)}
