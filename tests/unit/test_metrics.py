"""Per-group metrics on hand-made outcomes whose answers are worked out by hand below, and
evaluate() against a per-example loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from worker.engine.architectures import build_model
from worker.engine.errors import EngineError
from worker.engine.metrics import Outcomes, attribute_metrics, evaluate, overall_metrics

# Ten examples: group a (code 0) ×4, b (code 1) ×2, c (code 2) ×2, no group (−1) ×2; group "d" has none.
NAMES = ["a", "b", "c", "d"]
CODES = np.array([0, 0, 0, 0, 1, 1, 2, 2, -1, -1])
DENSE = Outcomes(
    pred=np.zeros(10, np.int64),
    correct=np.array([1, 1, 1, 1, 1, 0, 1, 1, 1, 0], bool),
    loss=np.array([0.1, 0.1, 0.2, 0.2, 0.5, 1.5, 0.3, 0.1, 0.4, 0.6]),
)
PRUNED = Outcomes(
    pred=np.zeros(10, np.int64),
    correct=np.array([1, 1, 1, 0, 0, 0, 1, 1, 0, 0], bool),
    loss=np.array([0.2, 0.2, 0.4, 1.2, 1.0, 2.0, 0.1, 0.1, 0.9, 1.9]),
)
# By hand:
#   dense accuracy: a 4/4 = 1, b 1/2 = .5, c 2/2 = 1; overall 8/10 = .8
#   pruned accuracy: a 3/4 = .75, b 0/2 = 0, c 2/2 = 1; overall 5/10 = .5
#   Δ = .8 − .5 = .3;  Δa = .25, Δb = .5, Δc = 0;  ψa = −.05, ψb = .2, ψc = −.3
#   dense loss: a .6/4 = .15, b 2/2 = 1, c .4/2 = .2; pruned loss: a 2/4 = .5, b 3/2 = 1.5, c .2/2 = .1
#   R: a .35, b .5, c −.1 → ξ = .5 − (−.1) = .6
#   FV pruned = 1 − 0 = 1; FV dense = 1 − .5 = .5; max ψ = .2; Ψ_PW = .2 − (−.3) = .5
#   std(Δ) with n−1: mean .25, squared deviations 0 + .0625 + .0625 = .125, /2 = .0625 → .25
#   overall loss: dense 4.0/10 = .4, pruned 8.0/10 = .8


def test_overall_metrics_by_hand() -> None:
    overall = overall_metrics(DENSE, PRUNED)
    assert overall.n == 10
    assert overall.dense_accuracy == pytest.approx(0.8)
    assert overall.accuracy == pytest.approx(0.5)
    assert overall.accuracy_drop == pytest.approx(0.3)
    assert overall.dense_loss == pytest.approx(0.4)
    assert overall.loss == pytest.approx(0.8)
    assert overall.excessive_loss == pytest.approx(0.4)


def test_group_metrics_by_hand() -> None:
    result = attribute_metrics("race", DENSE, PRUNED, CODES, NAMES)
    assert result.attribute == "race"
    assert result.n_missing == 2
    assert [g.group for g in result.groups] == ["a", "b", "c"]  # "d" has no examples
    by_group = {g.group: g for g in result.groups}
    expected = {
        # n, share, dense acc, acc, dense loss, loss, Δa, ψa, R(a)
        "a": (4, 0.4, 1.0, 0.75, 0.15, 0.5, 0.25, -0.05, 0.35),
        "b": (2, 0.2, 0.5, 0.0, 1.0, 1.5, 0.5, 0.2, 0.5),
        "c": (2, 0.2, 1.0, 1.0, 0.2, 0.1, 0.0, -0.3, -0.1),
    }
    for name, (n, share, dense_acc, acc, dense_loss, loss, drop, gap, excess) in expected.items():
        group = by_group[name]
        assert group.n == n
        assert group.share == pytest.approx(share)
        assert group.dense_accuracy == pytest.approx(dense_acc)
        assert group.accuracy == pytest.approx(acc)
        assert group.dense_loss == pytest.approx(dense_loss)
        assert group.loss == pytest.approx(loss)
        assert group.accuracy_drop == pytest.approx(drop)
        assert group.excess_accuracy_gap == pytest.approx(gap)
        assert group.excessive_loss == pytest.approx(excess)


def test_aggregates_by_hand() -> None:
    result = attribute_metrics("race", DENSE, PRUNED, CODES, NAMES)
    assert result.loss_fairness_violation == pytest.approx(0.6)
    assert result.accuracy_fairness_violation == pytest.approx(1.0)
    assert result.dense_accuracy_fairness_violation == pytest.approx(0.5)
    assert result.max_excess_accuracy_gap == pytest.approx(0.2)
    assert result.pairwise_disparity == pytest.approx(0.5)
    assert result.accuracy_drop_std == pytest.approx(0.25)
    assert result.worst_group_accuracy == pytest.approx(0.0)
    assert result.worst_group == "b"
    assert result.max_accuracy_drop == pytest.approx(0.5)
    assert result.undefined == {}


def test_one_group_leaves_spreads_undefined_with_a_reason() -> None:
    codes = np.array([0, 0, 0, 0, -1, -1, -1, -1, -1, -1])  # only group a has examples
    result = attribute_metrics("race", DENSE, PRUNED, codes, NAMES)
    assert [g.group for g in result.groups] == ["a"]
    assert result.n_missing == 6
    assert result.accuracy_drop_std is None
    assert result.undefined["accuracy_drop_std"] == "needs at least 2 groups; attribute race has only a"
    for spread in ("loss_fairness_violation", "accuracy_fairness_violation", "pairwise_disparity"):
        assert getattr(result, spread) is None and spread in result.undefined
    # ψa = .25 − .3 with Δ over all ten examples.
    assert result.max_excess_accuracy_gap == pytest.approx(-0.05)
    assert result.worst_group == "a"
    assert result.worst_group_accuracy == pytest.approx(0.75)


def test_no_group_at_all_leaves_every_aggregate_undefined() -> None:
    result = attribute_metrics("race", DENSE, PRUNED, np.full(10, -1), NAMES)
    assert result.groups == [] and result.n_missing == 10
    assert result.worst_group is None and result.max_excess_accuracy_gap is None
    assert len(result.undefined) == 9
    assert all("no evaluated example has a group" in reason for reason in result.undefined.values())


def test_weighted_excess_accuracy_gaps_sum_to_zero_when_groups_partition_the_data() -> None:
    rng = np.random.default_rng(7)
    n = 500
    dense = Outcomes(pred=np.zeros(n), correct=rng.random(n) < 0.9, loss=rng.random(n))
    pruned = Outcomes(pred=np.zeros(n), correct=rng.random(n) < 0.7, loss=rng.random(n) * 2)
    codes = rng.choice(5, size=n, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    result = attribute_metrics("group", dense, pruned, codes, ["g0", "g1", "g2", "g3", "g4"])
    gaps = np.array([g.excess_accuracy_gap for g in result.groups])
    shares = np.array([g.share for g in result.groups])
    assert shares.sum() == pytest.approx(1.0)
    assert float(shares @ gaps) == pytest.approx(0.0, abs=1e-12)
    assert result.max_excess_accuracy_gap >= 0 >= gaps.min()
    assert result.pairwise_disparity >= result.max_excess_accuracy_gap
    # Brute force ψ for g3 from the raw arrays.
    in_g3 = codes == 3
    drop_g3 = dense.correct[in_g3].mean() - pruned.correct[in_g3].mean()
    drop_all = dense.correct.mean() - pruned.correct.mean()
    assert result.groups[3].excess_accuracy_gap == pytest.approx(drop_g3 - drop_all)


def test_aggregates_are_never_nan() -> None:
    result = attribute_metrics("race", DENSE, PRUNED, CODES, NAMES)
    fields = ("loss_fairness_violation", "accuracy_drop_std", "pairwise_disparity")
    values = [getattr(result, field) for field in fields]
    assert all(isinstance(v, float) and math.isfinite(v) for v in values)


def test_group_codes_out_of_range_are_an_error() -> None:
    with pytest.raises(EngineError, match=r"must be in \[-1, 4\)"):
        attribute_metrics("race", DENSE, PRUNED, np.array([0, 0, 0, 0, 1, 1, 2, 2, 4, -1]), NAMES)
    with pytest.raises(EngineError, match="must be 10 integers"):
        attribute_metrics("race", DENSE, PRUNED, CODES[:5], NAMES)


def test_outcomes_reject_non_finite_losses_and_length_mismatch() -> None:
    with pytest.raises(EngineError, match="NaN or infinite"):
        Outcomes(pred=np.zeros(2), correct=np.ones(2, bool), loss=np.array([0.1, np.inf]))
    with pytest.raises(EngineError, match="disagree on the number of examples"):
        Outcomes(pred=np.zeros(3), correct=np.ones(2, bool), loss=np.zeros(2))


def _tiny_model_and_data(n: int = 37) -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    torch.manual_seed(0)
    model = build_model({"name": "cnn", "in_channels": 1, "image_size": 4, "channels": [3], "num_classes": 4})
    with torch.no_grad():  # BN running stats that differ from train-mode batch stats
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
    rng = np.random.default_rng(1)
    return model, rng.normal(size=(n, 1, 4, 4)).astype(np.float32), rng.integers(0, 4, size=n)


def test_evaluate_matches_a_per_example_loop(tmp_path) -> None:
    model, x, y = _tiny_model_and_data()
    path = tmp_path / "x.npy"
    np.save(path, x)
    x_memmap = np.load(path, mmap_mode="r")  # read-only, as the worker will pass it
    model.train()
    outcomes = evaluate(model, x_memmap, y, batch_size=8)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        for i in range(len(x)):
            logits = model(torch.from_numpy(x[i : i + 1]))
            label = torch.tensor([y[i]])
            assert outcomes.loss[i] == pytest.approx(F.cross_entropy(logits, label).item(), rel=1e-5, abs=1e-6)
            assert outcomes.pred[i] == int(logits.argmax())
            assert outcomes.correct[i] == (int(logits.argmax()) == y[i])
    assert outcomes.pred.dtype == np.int64 and outcomes.correct.dtype == bool and outcomes.loss.dtype == np.float64


def test_evaluate_rejects_labels_outside_the_model_classes() -> None:
    model, x, y = _tiny_model_and_data()
    y[20] = 4
    with pytest.raises(EngineError, match=r"labels must be class indices in \[0, 4\)"):
        evaluate(model, x, y, batch_size=8)
