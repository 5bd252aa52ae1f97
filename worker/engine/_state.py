"""What the group diagnostics (worker.engine.gradients, .directional, .curvature) share: the point a model's
loss is differentiated at (`State`), batches, the cells of several groupings, and the checks of their inputs.
Definitions: docs/METHODS.md §10–§12.

Conventions shared by every diagnostics function:

- `model` is evaluated functionally at `params` with `torch.func.functional_call`: `params` maps
  names of the model's parameters and/or buffers to tensors and overrides the module's own ones
  (`None` = the module's own state). So a caller whose module holds the pruned weights can pass the
  dense state. Derivatives are taken with respect to the model's trainable parameters
  (`requires_grad`); buffers and frozen parameters are constants. The model is put in eval mode
  (BatchNorm running statistics, no dropout) and its mode is restored afterwards; its own
  parameters and their `.grad` are never touched.
- Loss = cross-entropy. J_a is the MEAN loss over group a's examples; g_a = ∇J_a and H_a = ∇²J_a.
- `x`, `y` are numpy arrays (x may be a read-only memmap: one batch at a time is copied). Inputs are
  cast to the parameters' dtype, as in `outcomes.evaluate`.
- A grouping is an int array of codes, one per example, in 0..G−1, or −1 for "no group" (the
  example is left out of that grouping). Groups without examples get 0 and `counts == 0`; no NaN.
- `masks` (name → bool tensor, True = kept, as from `MagnitudePruner.compute_masks`) restrict
  everything to the unmasked coordinates: gradients become g ⊙ m, Hessians P H P with P = diag(m).
  Parameters without a mask are entirely kept.
- Curvature estimates draw their subsample, probes and start vectors from numpy Generators seeded
  with `seed`, so equal inputs give identical numbers.

Hessian-vector products use double backprop (reverse-over-reverse); measured on this CPU it beat
`torch.func` forward-over-reverse (jvp of grad) 2.4× for 32 probes on a 0.4M-parameter MLP (the
first-order graph is built once and reused by every probe). δᵀHδ uses forward-over-forward instead
(worker/engine/directional.py): slower per example, but per example, so a subsample states its error.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from worker.engine.errors import EngineError

Tensors = Mapping[str, torch.Tensor]
Device = torch.device | str


class State:
    """The point the model is evaluated at: trainable leaves (requiring grad, sharing memory with
    the given tensors), constant overrides, and the flattened mask."""

    def __init__(self, model: nn.Module, params: Tensors | None, masks: Tensors | None) -> None:
        self.model = model
        named = dict(model.named_parameters())
        known = {**named, **dict(model.named_buffers())}
        params = {} if params is None else dict(params)
        unknown = sorted(params.keys() - known.keys())
        if unknown:
            raise EngineError(f"params name tensors the model does not have: {', '.join(unknown[:5])}")
        for name, tensor in params.items():
            if tuple(tensor.shape) != tuple(known[name].shape):
                raise EngineError(
                    f"params[{name!r}] has shape {tuple(tensor.shape)}; the model expects {tuple(known[name].shape)}"
                )
        trainable = [name for name, p in named.items() if p.requires_grad]
        if not trainable:
            raise EngineError("the model has no trainable parameters to differentiate")
        self.leaves = {name: params.get(name, named[name]).detach().requires_grad_() for name in trainable}
        self.constants = {name: t.detach() for name, t in params.items() if name not in self.leaves}
        dtypes = {leaf.dtype for leaf in self.leaves.values()}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise EngineError(f"trainable parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
        self.dtype = next(iter(dtypes))
        self.device = next(iter(self.leaves.values())).device
        self.shapes = [leaf.shape for leaf in self.leaves.values()]
        self.sizes = [leaf.numel() for leaf in self.leaves.values()]
        self.numel = sum(self.sizes)
        self.masks = self._masks(masks)
        self.flat_mask = None if self.masks is None else torch.cat([m.flatten() for m in self.masks])

    def _masks(self, masks: Tensors | None) -> list[torch.Tensor] | None:
        return _aligned(self, masks, "mask", torch.ones_like) if masks else None

    def loss_sum(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of the model at this state on one batch."""
        logits = functional_call(self.model, {**self.constants, **self.leaves}, (inputs,))
        n_classes = logits.shape[1]
        if int(labels.max()) >= n_classes:
            raise EngineError(
                f"labels must be class indices in [0, {n_classes}) for this model; got label {int(labels.max())}"
            )
        if not torch.isfinite(logits).all():
            raise EngineError("the model produced NaN or infinite outputs; check the input scaling and the weights")
        return F.cross_entropy(logits, labels, reduction="sum")

    def masked(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.masks is None:
            return tensors
        return [t * m for t, m in zip(tensors, self.masks, strict=True)]

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [piece.view(shape) for piece, shape in zip(flat.split(self.sizes), self.shapes, strict=True)]


def load_batch(
    x: np.ndarray, y: np.ndarray, index: np.ndarray, dtype: torch.dtype, device: Device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Fancy indexing copies: a writable batch even when x is a read-only memmap.
    inputs = torch.from_numpy(np.asarray(x[index])).to(device=device, dtype=dtype)
    labels = torch.from_numpy(np.asarray(y[index], dtype=np.int64)).to(device)
    return inputs, labels


class eval_mode:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def aligned_directions(
    delta: Tensors | Sequence[Tensors] | None, state: State
) -> tuple[list[list[torch.Tensor]], bool]:
    """Directions as lists of tensors aligned with the leaves (missing names = 0), and whether a
    single dict (rather than a sequence) was given."""
    if delta is None:
        return [], False
    if isinstance(delta, Mapping):
        return [_aligned(state, delta, "delta", torch.zeros_like)], True
    return [_aligned(state, d, "delta", torch.zeros_like) for d in delta], False


def _aligned(state: State, tensors: Tensors, what: str, fill) -> list[torch.Tensor]:
    """`tensors` (name → tensor) as one tensor per trainable parameter, in the state's order, on its device
    and dtype; parameters not named get `fill(leaf)` (ones for masks, zeros for directions)."""
    unknown = sorted(tensors.keys() - state.leaves.keys())
    if unknown:
        raise EngineError(f"{what} names tensors that are not trainable parameters: {', '.join(unknown[:5])}")
    result = []
    for name, leaf in state.leaves.items():
        tensor = tensors.get(name)
        if tensor is not None and tensor.shape != leaf.shape:
            raise EngineError(f"{what} {name} has shape {tuple(tensor.shape)}; the parameter has {tuple(leaf.shape)}")
        result.append(
            fill(leaf, dtype=state.dtype).detach()
            if tensor is None
            else tensor.detach().to(device=state.device, dtype=state.dtype)
        )
    return result


def check_groupings(
    groupings: Sequence[np.ndarray], n_groups: Sequence[int] | None, n: int
) -> tuple[list[np.ndarray], list[int]]:
    if len(groupings) == 0:
        raise EngineError("at least one grouping is needed")
    if n_groups is not None and len(n_groups) != len(groupings):
        raise EngineError(f"{len(groupings)} groupings but {len(n_groups)} group counts")
    codes, sizes = [], []
    for k, grouping in enumerate(groupings):
        grouping = np.asarray(grouping)
        if grouping.shape != (n,) or not np.issubdtype(grouping.dtype, np.integer):
            raise EngineError(
                f"grouping {k} must be one integer code per example ({n}), got shape {grouping.shape} "
                f"and dtype {grouping.dtype}"
            )
        grouping = grouping.astype(np.int64)
        size = int(grouping.max(initial=-1)) + 1 if n_groups is None else int(n_groups[k])
        if size < 0:
            raise EngineError(f"grouping {k} cannot have {size} groups")
        if n and grouping.min() < -1:
            raise EngineError(f"grouping {k} has codes below −1 (−1 means no group)")
        if n and grouping.max() >= size:
            raise EngineError(f"grouping {k} has code {int(grouping.max())}, but only {size} groups (0..{size - 1})")
        codes.append(grouping)
        sizes.append(size)
    return codes, sizes


def check_data(x: np.ndarray, y: np.ndarray) -> None:
    if len(x) != len(y):
        raise EngineError(f"dataset has {len(x)} inputs but {len(y)} labels")
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise EngineError(f"labels must be integer class indices, got dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise EngineError(f"labels must be class indices ≥ 0, got {int(y.min())}")


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise EngineError(f"batch size must be at least 1, got {batch_size}")


def vdot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.vdot(a.double(), b.double()))


def cells(codes: list[np.ndarray], batch_size: int) -> Iterator[tuple[tuple[int, ...], list[np.ndarray]]]:
    """Yield (codes of the cell, its batches of example indices) for every cell (unique combination
    of codes, −1 included) with at least one code ≥ 0, in lexicographic order with codes[0] major.
    Within a cell, examples keep dataset order; a batch never mixes cells."""
    stacked = np.stack(codes, axis=1)
    keep = np.flatnonzero((stacked >= 0).any(axis=1))
    if len(keep) == 0:
        return
    order = keep[np.lexsort(stacked[keep].T[::-1])]
    rows = stacked[order]
    starts = np.flatnonzero(np.r_[True, (rows[1:] != rows[:-1]).any(axis=1)])
    ends = np.r_[starts[1:], len(order)]
    for start, end in zip(starts, ends, strict=True):
        batches = [order[b : min(b + batch_size, end)] for b in range(start, end, batch_size)]
        yield tuple(int(c) for c in rows[start]), batches
