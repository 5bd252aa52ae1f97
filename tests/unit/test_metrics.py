"""Per-group metrics on hand-made outcomes whose answers are worked out by hand below, and
evaluate() against a per-example loop."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from results.attributes import AttributeMetrics
from results.groups import GroupResult
from worker.engine.architectures import build_model
from worker.engine.errors import EngineError
from worker.engine.group_table import GROUP_FIELD_FAMILIES
from worker.engine.groupings import intersect
from worker.engine.metrics import attribute_metrics, overall_metrics
from worker.engine.outcomes import Outcomes, evaluate

BINARY_AGGREGATES = {
    f"{prefix}{name}"
    for prefix in ("", "dense_")
    for name in ("demographic_parity_difference", "demographic_parity_ratio", "equalized_odds_difference")
}


# The sections of a group the engine fills (its diagnostics are the pipeline's).
ENGINE_SECTIONS = ("confidence_intervals", "boundary", "flips", "confusion", "binary")


def _none_fields(result: AttributeMetrics) -> set[str]:
    # num_classes is an input (None = not known), not a metric.
    aggregates = result.aggregates
    return {name for name in type(aggregates).model_fields if getattr(aggregates, name) is None} - {"num_classes"}


def _none_group_fields(group: GroupResult) -> set[str]:
    none = {name for name in GroupResult.model_fields if getattr(group, name) is None}
    for section in ENGINE_SECTIONS:
        values = getattr(group, section)
        none |= {name for name in type(values).model_fields if getattr(values, name) is None}
    return none


def _json(result: AttributeMetrics) -> str:
    return json.dumps(result.model_dump(mode="json"), allow_nan=False)


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
    assert result.aggregates.loss_fairness_violation == pytest.approx(0.6)
    assert result.aggregates.accuracy_fairness_violation == pytest.approx(1.0)
    assert result.aggregates.dense_accuracy_fairness_violation == pytest.approx(0.5)
    assert result.aggregates.max_excess_accuracy_gap == pytest.approx(0.2)
    assert result.aggregates.pairwise_disparity == pytest.approx(0.5)
    assert result.aggregates.accuracy_drop_std == pytest.approx(0.25)
    assert result.aggregates.worst_group_accuracy == pytest.approx(0.0)
    assert result.aggregates.worst_group == "b"
    assert result.aggregates.max_accuracy_drop == pytest.approx(0.5)
    # Hand-made outcomes carry no number of classes and no bootstrap was asked for: only those are undefined.
    assert set(result.undefined) == {*BINARY_AGGREGATES, "max_excess_accuracy_gap_ci"}
    assert "number of classes unknown" in result.undefined["demographic_parity_difference"]
    assert "bootstrap not requested" in result.undefined["max_excess_accuracy_gap_ci"]


def test_one_group_leaves_spreads_undefined_with_a_reason() -> None:
    codes = np.array([0, 0, 0, 0, -1, -1, -1, -1, -1, -1])  # only group a has examples
    result = attribute_metrics("race", DENSE, PRUNED, codes, NAMES)
    assert [g.group for g in result.groups] == ["a"]
    assert result.n_missing == 6
    assert result.aggregates.accuracy_drop_std is None
    assert result.undefined["accuracy_drop_std"] == "needs at least 2 groups; attribute race has only a"
    for spread in ("loss_fairness_violation", "accuracy_fairness_violation", "pairwise_disparity"):
        assert getattr(result.aggregates, spread) is None and spread in result.undefined
    # ψa = .25 − .3 with Δ over all ten examples.
    assert result.aggregates.max_excess_accuracy_gap == pytest.approx(-0.05)
    assert result.aggregates.worst_group == "a"
    assert result.aggregates.worst_group_accuracy == pytest.approx(0.75)


def test_no_group_at_all_leaves_every_aggregate_undefined() -> None:
    result = attribute_metrics("race", DENSE, PRUNED, np.full(10, -1), NAMES)
    assert result.groups == [] and result.n_missing == 10
    assert result.aggregates.worst_group is None and result.aggregates.max_excess_accuracy_gap is None
    core = {k: v for k, v in result.undefined.items() if k not in {*BINARY_AGGREGATES, "max_excess_accuracy_gap_ci"}}
    assert len(core) == 9
    assert all("no evaluated example has a group" in reason for reason in core.values())
    assert _none_fields(result) <= set(result.undefined)


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
    assert result.aggregates.max_excess_accuracy_gap >= 0 >= gaps.min()
    assert result.aggregates.pairwise_disparity >= result.aggregates.max_excess_accuracy_gap
    # Brute force ψ for g3 from the raw arrays.
    in_g3 = codes == 3
    drop_g3 = dense.correct[in_g3].mean() - pruned.correct[in_g3].mean()
    drop_all = dense.correct.mean() - pruned.correct.mean()
    assert result.groups[3].excess_accuracy_gap == pytest.approx(drop_g3 - drop_all)


def test_aggregates_are_never_nan() -> None:
    result = attribute_metrics("race", DENSE, PRUNED, CODES, NAMES)
    fields = ("loss_fairness_violation", "accuracy_drop_std", "pairwise_disparity")
    values = [getattr(result.aggregates, field) for field in fields]
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


def test_evaluate_proxies_match_a_per_example_softmax() -> None:
    model, x, y = _tiny_model_and_data()
    outcomes = evaluate(model, x, y, batch_size=8)
    assert outcomes.num_classes == 4
    assert np.array_equal(outcomes.label, y)
    model.eval()
    with torch.no_grad():
        for i in range(len(x)):
            logits = model(torch.from_numpy(x[i : i + 1]))[0].double()
            probs = torch.softmax(logits, 0)
            others = [logits[c].item() for c in range(4) if c != y[i]]
            assert outcomes.p_true[i] == pytest.approx(probs[y[i]].item(), rel=1e-5, abs=1e-7)
            assert outcomes.gini[i] == pytest.approx(
                1 - sum(probs[c].item() ** 2 for c in range(4)), rel=1e-5, abs=1e-7
            )
            assert outcomes.margin[i] == pytest.approx(logits[y[i]].item() - max(others), rel=1e-5, abs=1e-5)
            assert (outcomes.margin[i] > 0) == outcomes.correct[i]


# ---- random outcomes compared with brute force and with Fairlearn -------------------------------------------


def _random_outcomes(
    rng: np.random.Generator, n: int, num_classes: int, label: np.ndarray, accuracy: float
) -> Outcomes:
    wrong = (label + rng.integers(1, num_classes, n)) % num_classes
    pred = np.where(rng.random(n) < accuracy, label, wrong)
    logits = rng.normal(size=(n, num_classes))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    masked = logits.copy()
    masked[np.arange(n), label] = -np.inf
    return Outcomes(
        pred=pred,
        correct=pred == label,
        loss=rng.exponential(1 / accuracy, n),
        label=label,
        p_true=probs[np.arange(n), label],
        gini=1 - (probs**2).sum(1),
        margin=logits[np.arange(n), label] - masked.max(1),
        num_classes=num_classes,
    )


def _random_case(seed: int, num_classes: int = 2, n: int = 3000, names=("a", "b", "c", "d", "e")):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, num_classes, n)
    dense = _random_outcomes(rng, n, num_classes, label, 0.85)
    pruned = _random_outcomes(rng, n, num_classes, label, 0.7)
    # Unequal groups, a few rows without a group.
    codes = rng.choice(
        np.arange(-1, len(names)),
        size=n,
        p=np.r_[0.03, np.geomspace(1, 0.05, len(names)) / np.geomspace(1, 0.05, len(names)).sum() * 0.97],
    )
    return dense, pruned, codes, list(names)


def test_proxies_flips_and_confusion_match_a_python_loop() -> None:
    dense, pruned, codes, names = _random_case(3, num_classes=3, n=1200)
    result = attribute_metrics("g", dense, pruned, codes, names)
    for group in result.groups:
        members = [i for i in range(len(codes)) if codes[i] >= 0 and names[codes[i]] == group.group]
        boundary, flips = group.boundary, group.flips
        for prefix, o in (("dense_", dense), ("", pruned)):
            p = [o.p_true[i] for i in members]
            n = len(p)
            assert getattr(boundary, prefix + "error_proxy") == pytest.approx(sum(1 - v for v in p) / n)
            assert getattr(boundary, prefix + "boundary_proximity") == pytest.approx(sum(v * (1 - v) for v in p) / n)
            assert getattr(boundary, prefix + "gini_impurity") == pytest.approx(sum(o.gini[i] for i in members) / n)
            assert getattr(boundary, prefix + "logit_margin") == pytest.approx(sum(o.margin[i] for i in members) / n)
            matrix = [[0] * 3 for _ in range(3)]
            for i in members:
                matrix[o.label[i]][o.pred[i]] += 1
            assert getattr(group.confusion, prefix + "confusion") == matrix
        to_wrong = sum(1 for i in members if dense.correct[i] and not pruned.correct[i])
        to_right = sum(1 for i in members if not dense.correct[i] and pruned.correct[i])
        changed = sum(1 for i in members if dense.pred[i] != pruned.pred[i])
        assert (flips.flips_correct_to_wrong, flips.flips_wrong_to_correct, flips.flips_any) == (
            to_wrong,
            to_right,
            changed,
        )
        assert flips.flips_any_rate == pytest.approx(changed / len(members))
        assert flips.flips_correct_to_wrong_rate == pytest.approx(to_wrong / len(members))
        assert flips.flips_wrong_to_correct_rate == pytest.approx(to_right / len(members))
        # Multi-class: the binary rates are undefined, with one reason for the family.
        assert group.binary.selection_rate is None and "2-class" in group.undefined["binary_rates"]
    assert result.aggregates.demographic_parity_difference is None
    assert "has 3 classes" in result.undefined["demographic_parity_difference"]


def _fairlearn_frame(label, pred, sensitive):
    import sklearn.metrics as skm
    from fairlearn.metrics import MetricFrame, false_positive_rate, selection_rate, true_positive_rate

    return MetricFrame(
        metrics={
            "accuracy": skm.accuracy_score,
            "selection_rate": selection_rate,
            "tpr": true_positive_rate,
            "fpr": false_positive_rate,
            "confusion": functools.partial(skm.confusion_matrix, labels=[0, 1]),
        },
        y_true=label,
        y_pred=pred,
        sensitive_features=sensitive,
    ).by_group


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_binary_metrics_equal_fairlearn(seed: int) -> None:
    from fairlearn.metrics import demographic_parity_difference, demographic_parity_ratio, equalized_odds_difference

    dense, pruned, codes, names = _random_case(seed)
    result = attribute_metrics("g", dense, pruned, codes, names)
    grouped = codes >= 0
    sensitive = np.array(names)[codes[grouped]]
    label = dense.label[grouped]
    assert result.aggregates.num_classes == 2 and result.caveats == {}
    for prefix, outcomes in (("dense_", dense), ("", pruned)):
        pred = outcomes.pred[grouped]
        frame = _fairlearn_frame(label, pred, sensitive)
        for group in result.groups:
            row = frame.loc[group.group]
            accuracy = group.dense_accuracy if prefix else group.accuracy
            assert accuracy == pytest.approx(row["accuracy"], abs=1e-15)
            assert getattr(group.binary, prefix + "selection_rate") == pytest.approx(row["selection_rate"], abs=1e-15)
            assert getattr(group.binary, prefix + "true_positive_rate") == pytest.approx(row["tpr"], abs=1e-15)
            assert getattr(group.binary, prefix + "false_positive_rate") == pytest.approx(row["fpr"], abs=1e-15)
            assert getattr(group.confusion, prefix + "confusion") == row["confusion"].tolist()
        kwargs = {"y_true": label, "y_pred": pred, "sensitive_features": sensitive}
        assert getattr(result.aggregates, prefix + "demographic_parity_difference") == pytest.approx(
            demographic_parity_difference(**kwargs), abs=1e-15
        )
        assert getattr(result.aggregates, prefix + "demographic_parity_ratio") == pytest.approx(
            demographic_parity_ratio(**kwargs), abs=1e-15
        )
        assert getattr(result.aggregates, prefix + "equalized_odds_difference") == pytest.approx(
            equalized_odds_difference(**kwargs), abs=1e-15
        )


def test_a_group_without_positives_has_no_tpr_where_fairlearn_says_zero() -> None:
    from fairlearn.metrics import false_positive_rate_difference, true_positive_rate_difference

    dense, pruned, codes, names = _random_case(5)
    label = dense.label.copy()
    in_c = codes == names.index("c")
    label[in_c] = 0  # group c: negatives only
    dense = dataclasses.replace(dense, label=label, correct=dense.pred == label)
    pruned = dataclasses.replace(pruned, label=label, correct=pruned.pred == label)
    result = attribute_metrics("g", dense, pruned, codes, names)
    c = next(g for g in result.groups if g.group == "c")
    assert c.binary.true_positive_rate is None and c.binary.dense_true_positive_rate is None
    assert c.undefined["true_positive_rate"] == "group c has no positive (class 1) examples"
    assert c.binary.false_positive_rate is not None and c.binary.selection_rate is not None
    grouped = codes >= 0
    sensitive = np.array(names)[codes[grouped]]
    frame = _fairlearn_frame(label[grouped], pruned.pred[grouped], sensitive)
    assert frame.loc["c", "tpr"] == 0.0  # sklearn's zero-division rule, silently
    # Ours: the TPR spread over the groups that have positives, the FPR spread over all; said in a caveat.
    has_positives = grouped & ~in_c
    tpr_spread = true_positive_rate_difference(
        label[has_positives], pruned.pred[has_positives], sensitive_features=np.array(names)[codes[has_positives]]
    )
    fpr_spread = false_positive_rate_difference(label[grouped], pruned.pred[grouped], sensitive_features=sensitive)
    assert result.aggregates.equalized_odds_difference == pytest.approx(max(tpr_spread, fpr_spread), abs=1e-15)
    assert (
        "left out" in result.caveats["equalized_odds_difference"]
        and ": c" in result.caveats["equalized_odds_difference"]
    )
    _json(result)


def test_tpr_defined_for_fewer_than_two_groups_leaves_equalized_odds_undefined() -> None:
    dense, pruned, codes, names = _random_case(6, names=("a", "b"))
    label = np.where(codes == 1, 1, np.where(codes == 0, 0, dense.label))  # a: negatives only, b: positives only
    dense = dataclasses.replace(dense, label=label, correct=dense.pred == label)
    pruned = dataclasses.replace(pruned, label=label, correct=pruned.pred == label)
    result = attribute_metrics("g", dense, pruned, codes, names)
    assert result.aggregates.equalized_odds_difference is None
    assert "TPR is defined for fewer than 2 groups" in result.undefined["equalized_odds_difference"]
    assert "FPR is defined for fewer than 2 groups" in result.undefined["equalized_odds_difference"]
    assert result.aggregates.demographic_parity_difference is not None
    _json(result)


def test_no_positive_prediction_leaves_the_parity_ratio_undefined_where_fairlearn_gives_nan() -> None:
    from fairlearn.metrics import demographic_parity_ratio

    dense, pruned, codes, names = _random_case(7)
    pred = np.zeros(len(codes), np.int64)
    pruned = dataclasses.replace(pruned, pred=pred, correct=pred == pruned.label)
    result = attribute_metrics("g", dense, pruned, codes, names)
    grouped = codes >= 0
    assert math.isnan(demographic_parity_ratio(pruned.label[grouped], pred[grouped], sensitive_features=codes[grouped]))
    assert result.aggregates.demographic_parity_ratio is None
    assert "no group of g has any positive prediction" in result.undefined["demographic_parity_ratio"]
    assert result.aggregates.demographic_parity_difference == 0.0
    assert result.aggregates.dense_demographic_parity_ratio is not None


def test_binary_labels_are_worked_out_when_the_outcomes_carry_none() -> None:
    dense, pruned, codes, names = _random_case(8)
    bare = [Outcomes(pred=o.pred, correct=o.correct, loss=o.loss) for o in (dense, pruned)]
    with_labels = attribute_metrics("g", dense, pruned, codes, names)
    without = attribute_metrics("g", *bare, codes, names, num_classes=2)
    for a, b in zip(with_labels.groups, without.groups, strict=True):
        assert a.confusion.confusion == b.confusion.confusion
        assert a.binary.true_positive_rate == b.binary.true_positive_rate
        assert b.boundary.error_proxy is None and "no probabilities" in b.undefined["proxies"]
    assert without.aggregates.equalized_odds_difference == with_labels.aggregates.equalized_odds_difference


def test_small_groups_are_flagged() -> None:
    dense, pruned, codes, names = _random_case(9, n=600)
    sizes = {g.group: g.n for g in attribute_metrics("g", dense, pruned, codes, names).groups}
    for threshold in (30, 100):
        result = attribute_metrics("g", dense, pruned, codes, names, min_group_size=threshold)
        assert result.aggregates.small_groups == [g for g in names if g in sizes and sizes[g] < threshold]
        assert [g.small_group for g in result.groups] == [sizes[g.group] < threshold for g in result.groups]
        assert result.aggregates.min_group_size == threshold
    assert any(n < 30 for n in sizes.values()) and any(n >= 30 for n in sizes.values())


def test_confusion_over_the_cell_limit_is_left_out_with_a_reason() -> None:
    dense, pruned, codes, names = _random_case(10, num_classes=4, n=400)
    result = attribute_metrics("g", dense, pruned, codes, names, max_confusion_cells=20)
    assert all(
        g.confusion.confusion is None
        and g.confusion.dense_confusion is None
        and "over the limit of 20" in g.undefined["confusion"]
        for g in result.groups
    )


def test_every_none_has_a_reason_and_json_has_no_nan() -> None:
    cases = [
        attribute_metrics("race", DENSE, PRUNED, CODES, NAMES),
        attribute_metrics("race", DENSE, PRUNED, np.full(10, -1), NAMES, bootstrap_resamples=50),
        attribute_metrics(
            "g",
            *[Outcomes(pred=o.pred, correct=o.correct, loss=o.loss) for o in _random_case(4)[:2]],
            _random_case(4)[2],
            list("abcde"),
            num_classes=2,
            bootstrap_resamples=50,
        ),
        attribute_metrics(
            "g",
            *_random_case(11, num_classes=3, n=500)[:2],
            _random_case(11, n=500)[2],
            list("abcde"),
            bootstrap_resamples=50,
        ),
    ]
    for result in cases:
        _json(result)
        assert _none_fields(result) <= set(result.undefined)
        for group in result.groups:
            covered = set(group.undefined)
            for family in covered & set(GROUP_FIELD_FAMILIES):
                covered |= set(GROUP_FIELD_FAMILIES[family])
            none = _none_group_fields(group)
            assert none <= covered, none - covered


def test_mismatched_labels_and_classes_are_errors() -> None:
    with pytest.raises(EngineError, match="`correct` is not `pred == label`"):
        Outcomes(pred=np.array([0, 1]), correct=np.array([True, True]), loss=np.zeros(2), label=np.array([0, 0]))
    dense, pruned, codes, names = _random_case(12, n=100)
    with pytest.raises(EngineError, match="number of classes disagrees"):
        attribute_metrics("g", dense, pruned, codes, names, num_classes=3)
    with pytest.raises(EngineError, match="different labels"):
        attribute_metrics(
            "g",
            dense,
            dataclasses.replace(pruned, label=1 - pruned.label, correct=pruned.pred == 1 - pruned.label),
            codes,
            names,
        )


# ---- intersections -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_intersect_matches_a_brute_force_dict(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 2000
    race_names, sex_names, age_names = ["Asian", "Black", "White", "Other"], ["F", "M"], ["<30", "30-60", ">60"]
    race = rng.integers(-1, 4, n)
    sex = rng.integers(-1, 2, n)
    age = rng.integers(0, 3, n)
    age[(race == 3) & (sex == 0)] = 2  # some combinations never occur
    name, codes, names = intersect([("race", race, race_names), ("sex", sex, sex_names), ("age", age, age_names)])
    assert name == "race&sex&age"
    combos = {}
    for i in range(n):
        if race[i] < 0 or sex[i] < 0 or age[i] < 0:
            assert codes[i] == -1
            continue
        combos.setdefault((race[i], sex[i], age[i]), []).append(i)
    expected_names = [f"{race_names[r]}&{sex_names[s]}&{age_names[a]}" for r, s, a in sorted(combos)]
    assert names == expected_names and len(names) < 4 * 2 * 3
    for code, key in enumerate(sorted(combos)):
        assert np.flatnonzero(codes == code).tolist() == combos[key]
    # Row order does not change the codes of a combination.
    perm = rng.permutation(n)
    _, permuted, permuted_names = intersect(
        [("race", race[perm], race_names), ("sex", sex[perm], sex_names), ("age", age[perm], age_names)]
    )
    assert permuted_names == names and np.array_equal(permuted, codes[perm])
    # The intersection feeds attribute_metrics as any attribute; missing rows are counted, not dropped.
    dense, pruned, _, _ = _random_case(seed, n=n)
    result = attribute_metrics(name, dense, pruned, codes, names)
    assert result.n_missing == int(((race < 0) | (sex < 0)).sum())
    assert sum(g.n for g in result.groups) + result.n_missing == n


def test_intersect_of_huge_code_spaces_uses_unique_rows() -> None:
    big = [f"v{i}" for i in range(1 << 21)]
    codes = [
        np.array([5, 5, -1, 7, 5]),
        np.array([1, 1, 1, 0, 0]),
        np.array([2, 2, 2, 2, 3]),
        np.array([9, 9, 9, 9, 9]),
    ]
    name, out, names = intersect([(f"a{k}", c, big) for k, c in enumerate(codes)])
    assert name == "a0&a1&a2&a3"
    assert out.tolist() == [1, 1, -1, 2, 0]  # sorted by the codes, first attribute slowest
    assert names == ["v5&v0&v3&v9", "v5&v1&v2&v9", "v7&v0&v2&v9"]
