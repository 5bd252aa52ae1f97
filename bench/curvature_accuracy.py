"""`curvature_accuracy`: the audit's curvature estimates against the exact Hessian, on small models trained on
real data (scikit-learn's digits, 8×8 images, the digit as the group): an MLP 64-32-10 (2,410 parameters) and a
BatchNorm CNN (channels 4, 8; 1,090 parameters), float64, at the audit's defaults (adaptive Hutchinson with a
0.1 target relative error and at most 16 probes, Lanczos with at most 20 steps, 64 examples per group for the
Hessian figures, 256 for the Gauss–Newton trace). The exact Hessian and Gauss–Newton matrix of each group's
subsample are built in full (torch.autograd.functional). Value = the share of (model, group, seed) whose stated
95% t-interval of the Hessian trace covers the exact trace; details give the same for the Gauss–Newton trace,
λ_max's relative error and whether the exact λ_max lies within the Lanczos bound."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import t as student_t
from sklearn.datasets import load_digits
from torch.func import functional_call

from bench.common import emit
from worker.engine.architectures import build_model
from worker.engine.curvature import curvature_subsample, group_curvature
from worker.engine.finetune import finetune
from worker.engine.gauss_newton import group_gauss_newton_trace

MODELS = {
    "mlp": ({"name": "mlp", "in_features": 64, "hidden": [32], "num_classes": 10}, (64,)),
    "cnn": ({"name": "cnn", "in_channels": 1, "image_size": 8, "channels": [4, 8], "num_classes": 10}, (1, 8, 8)),
}
SEEDS = 3
# What explains a coverage short of the target when it happens (measured 2026-12-01: 0.88 with plain Hutchinson,
# 0.98 once deflated by the Lanczos basis).
WHY_MISSED = (
    "vᵀ(I−QQᵀ)H(I−QQᵀ)v over Rademacher probes can still be heavy-tailed, so the sample standard error of few "
    "probes understates the spread now and then (see mean_probes)"
)
HESSIAN_EXAMPLES, SAMPLED_EXAMPLES = 64, 256


def _trained(spec: dict, x: np.ndarray, y: np.ndarray) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(spec)
    finetune(model, x.astype(np.float32), y, epochs=10, lr=1e-2, optimizer="adam", batch_size=64, seed=0)
    return model.double().eval()


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _at(model: torch.nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    pieces = flat.split([p.numel() for p in model.parameters()])
    return {n: t.view_as(p) for n, t, p in zip(names, pieces, model.parameters(), strict=True)}


def _exact(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(Tr H, λ_max H, Tr G) of the mean loss over (x, y)."""
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)

    def logits(v: torch.Tensor) -> torch.Tensor:
        return functional_call(model, _at(model, v), (inputs,))

    flat = _flat(model)
    hessian = torch.autograd.functional.hessian(lambda v: F.cross_entropy(logits(v), labels), flat, vectorize=True)
    jacobian = torch.autograd.functional.jacobian(logits, flat, vectorize=True)
    p = torch.softmax(logits(flat), 1).detach()
    curvature = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    gauss_newton = float(torch.einsum("ncp,ncd,ndp->n", jacobian, curvature, jacobian).mean())
    return float(hessian.trace()), float(torch.linalg.eigvalsh(hessian)[-1]), gauss_newton


def _checks(name: str, model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> list[dict]:
    rows = []
    for seed in range(SEEDS):
        curvature = group_curvature(
            model,
            None,
            x,
            y,
            y,
            10,
            probes=16,
            target_rse=0.1,
            lanczos_steps=20,
            max_examples=HESSIAN_EXAMPLES,
            seed=seed,
        )
        (gauss_newton,) = group_gauss_newton_trace(
            model, None, x, y, [y], n_groups=[10], max_examples=SAMPLED_EXAMPLES, seed=seed
        )
        for group in range(10):
            members = np.flatnonzero(y == group)
            chosen = members[curvature_subsample(len(members), HESSIAN_EXAMPLES, (seed, group))]
            trace, top, _ = _exact(model, x[chosen], y[chosen])
            sampled = members[curvature_subsample(len(members), SAMPLED_EXAMPLES, (seed, 0, group))]
            _, _, gn = _exact(model, x[sampled], y[sampled])
            probes = int(curvature.trace_probes[group])
            estimate, bound = float(curvature.top_eigenvalue[group]), float(curvature.top_eigenvalue_error[group])
            rows.append(
                {
                    "model": name,
                    "trace_covered": abs(curvature.trace[group] - trace)
                    <= student_t.ppf(0.975, probes - 1) * curvature.trace_se[group],
                    "probes": probes,
                    "top_relative_error": abs(estimate - top) / abs(top),
                    "top_within_bound": estimate - 1e-12 <= top <= estimate + bound + 1e-12,
                    "gauss_newton_covered": abs(gauss_newton.trace[group] - gn)
                    <= student_t.ppf(0.975, len(sampled) - 1) * gauss_newton.trace_se[group],
                }
            )
    return rows


def main() -> None:
    started = time.perf_counter()
    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float64), digits.target.astype(np.int64)
    rows = []
    for name, (spec, shape) in MODELS.items():
        inputs = x.reshape(-1, *shape)
        rows += _checks(name, _trained(spec, inputs, y), inputs, y)
    share = float(np.mean([r["trace_covered"] for r in rows]))
    errors = [r["top_relative_error"] for r in rows]
    emit(
        "curvature_accuracy",
        share,
        "share of groups",
        ">= 0.9",
        share >= 0.9,
        {
            "checks": len(rows),
            "models": {name: f"{spec}" for name, (spec, _) in MODELS.items()},
            "data": "sklearn load_digits, 1,797 examples, 10 groups (the digit), seeds 0–2",
            "hessian_examples_per_group": HESSIAN_EXAMPLES,
            "gauss_newton_examples_per_group": SAMPLED_EXAMPLES,
            "gauss_newton_interval_coverage": round(float(np.mean([r["gauss_newton_covered"] for r in rows])), 3),
            "top_eigenvalue_relative_error_median": float(np.median(errors)),
            "top_eigenvalue_relative_error_max": float(np.max(errors)),
            "top_eigenvalue_within_bound": round(float(np.mean([r["top_within_bound"] for r in rows])), 3),
            "mean_probes": round(float(np.mean([r["probes"] for r in rows])), 1),
            "seconds": round(time.perf_counter() - started, 1),
            **({"why_missed": WHY_MISSED} if share < 0.9 else {}),
        },
    )


if __name__ == "__main__":
    main()
