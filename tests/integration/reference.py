"""Brute-force reference for the report: plain numpy, written independently of worker/engine."""

from __future__ import annotations

import numpy as np


def prune_reference(state: dict[str, np.ndarray], ratio: float, scope: str) -> dict[str, np.ndarray]:
    weights = [k for k, v in state.items() if k.endswith(".weight") and v.ndim >= 2]
    pruned = {k: v.copy() for k, v in state.items()}
    if scope == "layerwise":
        for key in weights:
            flat = pruned[key].reshape(-1)
            order = sorted(range(flat.size), key=lambda i: (abs(flat[i]), i))
            flat[order[: round(ratio * flat.size)]] = 0.0
        return pruned
    entries = [(abs(float(v)), key, i) for key in weights for i, v in enumerate(state[key].reshape(-1))]
    total = len(entries)
    for _magnitude, key, index in sorted(entries, key=lambda e: e[0])[: round(ratio * total)]:
        pruned[key].reshape(-1)[index] = 0.0
    return pruned


def mlp_logits(state: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    keys = sorted({k.rsplit(".", 1)[0] for k in state}, key=lambda k: int(k.split(".")[1]))
    h = x.reshape(len(x), -1).astype(np.float64)
    for position, layer in enumerate(keys):
        h = h @ state[f"{layer}.weight"].astype(np.float64).T + state[f"{layer}.bias"]
        if position < len(keys) - 1:
            h = np.maximum(h, 0.0)
    return h


def per_group(state: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> dict:
    logits = mlp_logits(state, x)
    shifted = logits - logits.max(axis=1, keepdims=True)
    losses = np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(y)), y]
    correct = logits.argmax(axis=1) == y
    result = {"overall": (correct.mean(), losses.mean())}
    for group in np.unique(groups):
        members = groups == group
        result[str(group)] = (correct[members].mean(), losses[members].mean())
    return result


def group_gradients(
    state: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    kept: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Each group's mean-loss gradient, by autograd on the whole group at once (float64), masked to the
    kept entries when `kept` is given."""
    import torch

    result = {}
    for group in np.unique(groups):
        members = groups == group
        params = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in state.items()}
        layers = sorted({k.rsplit(".", 1)[0] for k in state}, key=lambda k: int(k.split(".")[1]))
        h = torch.tensor(x[members].reshape(int(members.sum()), -1), dtype=torch.float64)
        for position, layer in enumerate(layers):
            h = h @ params[f"{layer}.weight"].T + params[f"{layer}.bias"]
            if position < len(layers) - 1:
                h = torch.relu(h)
        loss = torch.nn.functional.cross_entropy(h, torch.tensor(y[members]))
        loss.backward()
        grads = []
        for key, param in params.items():
            grad = param.grad.numpy()
            if kept is not None and key in kept:
                grad = grad * kept[key]
            grads.append(grad.reshape(-1))
        result[str(group)] = np.concatenate(grads)
    return result
