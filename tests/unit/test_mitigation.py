"""Mitigations: on a constructed problem where plain fine-tuning of the pruned model leaves a minority group
behind, equalized_loss and ceag shrink that group's excess accuracy gap on the training split; the
multiplier rules checked step by step against numbers computed by hand; masks kept through training."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from worker.engine.architectures import build_model
from worker.engine.errors import EngineError
from worker.engine.finetune import finetune
from worker.engine.mitigation import (
    ConstrainedExcessAccuracyGap,
    EqualizedLoss,
    GroupBaseline,
    ReplayBuffers,
    mitigate,
)
from worker.engine.outcomes import Outcomes, evaluate
from worker.engine.pruning import MagnitudePruner, apply_masks, prunable_weights


def minority_problem(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two groups: 90% whose label follows large-scale features 0–3, 10% whose label follows features 10–13,
    which are small in scale (so the weights that read them are small, and magnitude pruning removes them)."""
    rng = np.random.default_rng(seed)
    group = (rng.random(n) < 0.1).astype(np.int64)
    x = rng.normal(size=(n, 20)).astype(np.float32)
    majority_score = x[:, :4] @ np.array([2.0, -2.0, 1.5, 1.0])
    minority_score = x[:, 10:14] @ np.array([0.6, -0.6, 0.5, 0.4])
    y = (np.where(group == 0, majority_score, minority_score) > 0).astype(np.int64)
    x[:, 10:14] *= 0.3
    return x, y, group


@pytest.fixture(scope="module")
def pruned_minority_problem():
    x, y, group = minority_problem(4000, seed=0)
    torch.manual_seed(0)
    dense = build_model({"name": "mlp", "in_features": 20, "hidden": [64, 64], "num_classes": 2})
    finetune(dense, x, y, epochs=30, lr=0.05, seed=0)
    masks = MagnitudePruner(scope="global", ignored_layers=[]).compute_masks(dense, 0.9)
    return dense, masks, x, y, group


def group_excess_gaps(dense, model, x, y, group) -> np.ndarray:
    """ψ_a = Δ_a − Δ by brute force over the two groups."""
    before = evaluate(dense, x, y, batch_size=1024).correct
    after = evaluate(model, x, y, batch_size=1024).correct
    overall_drop = before.mean() - after.mean()
    return np.array([(before[group == a].mean() - after[group == a].mean()) - overall_drop for a in (0, 1)])


def run_mitigation(problem, name: str, **options):
    dense, masks, x, y, group = problem
    model = copy.deepcopy(dense)
    apply_masks(model, masks)
    baseline = GroupBaseline.from_outcomes(evaluate(dense, x, y, batch_size=1024), group, 2)
    result = mitigate(
        model, x, y, group, 2, name=name, epochs=5, lr=0.01, masks=masks, baseline=baseline, seed=0, **options
    )
    return model, result


def test_constrained_mitigations_shrink_the_minority_gap_that_fine_tuning_leaves(pruned_minority_problem) -> None:
    dense, masks, x, y, group = pruned_minority_problem
    gaps = {}
    for name in ("finetune", "equalized_loss", "ceag"):
        model, _ = run_mitigation(
            pruned_minority_problem, name, dual_lr={"finetune": 0.0, "equalized_loss": 0.2, "ceag": 0.05}[name]
        )
        gaps[name] = group_excess_gaps(dense, model, x, y, group)[1]
    # Fine-tuning recovers the majority and leaves the minority behind (ψ ≈ 0.20 at this seed); both
    # constrained methods cut the minority's gap by more than 10 points (to ≈ 0.05 and ≈ −0.06). ceag's step
    # is 0.05 here: 32 mini-batches per epoch over two groups move BA's 0.01 too little in five epochs.
    assert gaps["finetune"] > 0.15
    assert gaps["equalized_loss"] < gaps["finetune"] - 0.1
    assert gaps["ceag"] < gaps["finetune"] - 0.1


def test_multipliers_stay_non_negative_and_only_the_violated_group_gets_one(pruned_minority_problem) -> None:
    _, ceag = run_mitigation(pruned_minority_problem, "ceag", dual_lr=0.01)
    assert ceag.multipliers[0] == 0.0  # the majority gains on average: its ψ is below ε throughout
    assert ceag.multipliers[1] > 0.1
    _, equalized = run_mitigation(pruned_minority_problem, "equalized_loss", dual_lr=0.2)
    history = np.array(equalized.multiplier_history)
    assert (history >= 0).all() and (np.diff(history, axis=0) >= 0).all()  # |J_a − J| ≥ 0: λ never falls
    assert equalized.multipliers[1] > 5 * equalized.multipliers[0]  # the minority's loss is further from J


def test_masks_stay_applied_through_every_mitigation(pruned_minority_problem) -> None:
    dense, masks, *_ = pruned_minority_problem
    for name in ("finetune", "equalized_loss", "ceag"):
        model, _ = run_mitigation(pruned_minority_problem, name, dual_lr=0.0 if name == "finetune" else 0.1)
        weights = prunable_weights(model)
        for layer, keep in masks.items():
            assert not weights[layer][~keep].any(), f"{name} revived pruned weights of {layer}"
            assert int((weights[layer] == 0).sum()) == int((~keep).sum())  # sparsity unchanged


def test_equalized_loss_objective_and_dual_step_by_hand() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 3, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    codes = np.array([0, 0, 1, 1, 1, -1])  # group 2 has no example in this batch; row 5 is in no group
    objective = EqualizedLoss(codes, 3, dual_lr=0.5)
    objective.multipliers[:] = [0.3, 0.7, 2.0]
    value = objective(logits, labels, np.arange(6))
    losses = F.cross_entropy(logits, labels, reduction="none").detach().numpy()
    overall = losses.mean()
    violations = [abs(losses[:2].mean() - overall), abs(losses[2:5].mean() - overall)]
    assert float(value.detach()) == pytest.approx(overall + 0.3 * violations[0] + 0.7 * violations[1], rel=1e-6)
    objective(logits, labels, np.array([0, 1, 2, 3, 4, 5]))  # a second, identical batch in the same epoch
    objective.end_epoch()
    expected = [0.3 + 0.5 * violations[0], 0.7 + 0.5 * violations[1], 2.0]  # group 2 was absent: unchanged
    assert objective.multipliers == pytest.approx(expected, rel=1e-6)
    assert objective.dual_steps.tolist() == [1, 1, 0]


def test_ceag_dual_step_uses_full_buffers_only_by_hand() -> None:
    codes = np.array([0] * 6 + [1] * 2 + [2] * 2)  # training shares 0.6, 0.2, 0.2
    baseline = GroupBaseline(
        group_loss=np.array([0.2, 0.4, 0.3]), group_accuracy=np.array([0.9, 0.8, 0.7]), loss=0.27, accuracy=0.85
    )
    objective = ConstrainedExcessAccuracyGap(codes, 3, baseline, dual_lr=0.1, tolerance=0.01, buffer_size=4)
    objective.buffers.add(np.array([1, 1, 0, 1, 0, 1, 0]), np.array([0, 0, 0, 1, 1, 2, 2]))
    objective.dual_step()
    assert objective.multipliers.tolist() == [0.0, 0.0, 0.0]  # no buffer holds 4 outcomes yet
    objective.buffers.add(np.array([1, 0, 0]), np.array([0, 1, 1]))
    objective.dual_step()
    # Full now: group 0 holds [1, 1, 0, 1] (0.75) and group 1 [1, 0, 0, 0] (0.25); group 2 has two, so it waits.
    accuracy_0, accuracy_1 = 0.75, 0.25
    overall = (0.6 * accuracy_0 + 0.2 * accuracy_1) / 0.8
    psi = [(0.9 - accuracy_0) - (0.85 - overall), (0.8 - accuracy_1) - (0.85 - overall)]
    expected = [max(0.0, 0.1 * (p - 0.01)) for p in psi]
    assert objective.multipliers[:2] == pytest.approx(expected)
    assert expected[0] == 0.0 and expected[1] > 0  # group 0 is ahead: its multiplier is clipped at 0
    assert objective.multipliers[2] == 0.0 and objective.dual_steps.tolist() == [1, 1, 0]


def test_ceag_objective_is_the_loss_plus_weighted_surrogates_of_the_batch_groups() -> None:
    torch.manual_seed(1)
    logits = torch.randn(5, 2)
    labels = torch.tensor([0, 1, 1, 0, 1])
    codes = np.array([0, 0, 1, 1, 1])
    baseline = GroupBaseline(np.array([0.5, 0.6]), np.array([1.0, 1.0]), loss=0.55, accuracy=1.0)
    objective = ConstrainedExcessAccuracyGap(codes, 2, baseline, dual_lr=0.0, tolerance=0.0, buffer_size=100)
    objective.multipliers[:] = [0.25, 1.5]
    losses = F.cross_entropy(logits, labels, reduction="none").numpy()
    overall = losses.mean()
    surrogate = [(losses[:2].mean() - 0.5) - (overall - 0.55), (losses[2:].mean() - 0.6) - (overall - 0.55)]
    value = objective(logits, labels, np.arange(5))
    assert float(value) == pytest.approx(overall + 0.25 * surrogate[0] + 1.5 * surrogate[1], rel=1e-6)


def test_replay_buffer_keeps_the_last_k_outcomes_of_each_group() -> None:
    buffers = ReplayBuffers(2, size=3)
    buffers.add(np.array([1, 0, 1, 1, 0]), np.array([0, 0, 0, 0, -1]))
    full, accuracy = buffers.full_accuracies()
    assert full.tolist() == [0] and accuracy.tolist() == [pytest.approx(2 / 3)]  # the last three of group 0
    assert list(buffers.buffers[1]) == []  # the row in no group went nowhere
    with pytest.raises(EngineError):
        ReplayBuffers(2, size=0)


def test_group_baseline_is_the_per_group_mean_of_the_dense_outcomes() -> None:
    outcomes = Outcomes(
        pred=np.array([0, 1, 1, 0]), correct=np.array([True, False, True, True]), loss=np.array([0.1, 2.0, 0.3, 0.5])
    )
    baseline = GroupBaseline.from_outcomes(outcomes, np.array([0, 0, 1, -1]), 3)
    assert baseline.group_loss[:2].tolist() == pytest.approx([1.05, 0.3])
    assert baseline.group_accuracy[:2].tolist() == [0.5, 1.0]
    assert np.isnan(baseline.group_loss[2]) and baseline.loss == pytest.approx(0.725) and baseline.accuracy == 0.75


def test_bad_mitigation_arguments_are_engine_errors() -> None:
    model = build_model({"name": "mlp", "in_features": 4, "hidden": [4], "num_classes": 2})
    x, y = np.zeros((8, 4), np.float32), np.zeros(8, np.int64)
    with pytest.raises(EngineError, match="baseline"):
        mitigate(model, x, y, np.zeros(8), 1, name="ceag", epochs=1, lr=0.1)
    with pytest.raises(EngineError, match="group codes"):
        mitigate(model, x, y, np.full(8, 3), 2, name="equalized_loss", epochs=1, lr=0.1)
    with pytest.raises(EngineError, match="unknown mitigation"):
        mitigate(model, x, y, np.zeros(8), 1, name="reweigh", epochs=1, lr=0.1)
