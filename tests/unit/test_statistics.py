"""Bootstrap intervals on synthetic data with known rates (coverage), against a brute-force index bootstrap,
determinism, memory at 1,000,000 examples; Spearman against the textbook formula and its undefined cases."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from worker.engine.errors import EngineError
from worker.engine.metrics import attribute_metrics
from worker.engine.outcomes import Outcomes
from worker.engine.statistics import (
    ANALYTIC_MIN_GROUP,
    bootstrap_group_intervals,
    bootstrap_mean_quantiles,
    spearman,
)

SIZES = np.array([150, 300, 80])  # three groups, plus rows without a group
MISSING = 40
DENSE_P = np.array([0.9, 0.8, 0.85, 0.7])  # per stratum (last = no group)
PRUNED_P = np.array([0.75, 0.78, 0.6, 0.5])
DENSE_LOSS = np.array([0.3, 0.5, 0.4, 0.6])  # exponential means
PRUNED_LOSS = np.array([0.6, 0.55, 0.9, 1.0])


def _synthetic(rng: np.random.Generator):
    codes = np.repeat(np.arange(-1, len(SIZES)), np.r_[MISSING, SIZES])
    stratum = np.where(codes < 0, len(SIZES), codes)
    dense_correct = rng.random(len(codes)) < DENSE_P[stratum]
    pruned_correct = rng.random(len(codes)) < PRUNED_P[stratum]
    dense_loss = rng.exponential(DENSE_LOSS[stratum])
    pruned_loss = rng.exponential(PRUNED_LOSS[stratum])
    return dense_correct, pruned_correct, dense_loss, pruned_loss, codes


def test_intervals_cover_known_rates_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(2024)
    weights = np.r_[SIZES, MISSING] / (SIZES.sum() + MISSING)
    overall_drop = float(weights @ (DENSE_P - PRUNED_P))  # stratified design: stratum sizes are fixed
    truth = {
        "accuracy": PRUNED_P[:3],
        "dense_accuracy": DENSE_P[:3],
        "accuracy_drop": (DENSE_P - PRUNED_P)[:3],
        "excess_accuracy_gap": (DENSE_P - PRUNED_P)[:3] - overall_drop,
        "excessive_loss": (PRUNED_LOSS - DENSE_LOSS)[:3],
    }
    covered = {name: 0 for name in truth}
    datasets = 200
    for k in range(datasets):
        intervals = bootstrap_group_intervals(*_synthetic(rng), resamples=1000, seed=k)
        for name, value in truth.items():
            bounds = getattr(intervals, name)
            covered[name] += int(((bounds[:, 0] <= value) & (value <= bounds[:, 1])).sum())
    coverage = {name: count / (datasets * len(SIZES)) for name, count in covered.items()}
    assert all(0.90 <= c <= 0.99 for c in coverage.values()), coverage


def _brute_force_bootstrap(dense_correct, pruned_correct, dense_loss, pruned_loss, codes, resamples, rng):
    """Index resampling within every stratum, all statistics from the same indices."""
    strata = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)] + [np.flatnonzero(codes < 0)]
    out = {name: [] for name in ("accuracy", "accuracy_drop", "excess_accuracy_gap", "excessive_loss", "max")}
    for _ in range(resamples):
        picks = [members[rng.integers(0, len(members), len(members))] for members in strata]
        everything = np.concatenate(picks)
        overall = dense_correct[everything].mean() - pruned_correct[everything].mean()
        drops = [dense_correct[p].mean() - pruned_correct[p].mean() for p in picks[:-1]]
        out["accuracy"].append([pruned_correct[p].mean() for p in picks[:-1]])
        out["accuracy_drop"].append(drops)
        out["excess_accuracy_gap"].append([drop - overall for drop in drops])
        out["excessive_loss"].append([pruned_loss[p].mean() - dense_loss[p].mean() for p in picks[:-1]])
        out["max"].append(max(drop - overall for drop in drops))
    return {name: np.quantile(np.array(values), [0.025, 0.975], axis=0) for name, values in out.items()}


def test_intervals_agree_with_a_brute_force_index_bootstrap() -> None:
    data = _synthetic(np.random.default_rng(1))
    resamples = 4000
    ours = bootstrap_group_intervals(*data, resamples=resamples, seed=3)
    brute = _brute_force_bootstrap(*data, resamples, np.random.default_rng(4))
    # Two independent Monte Carlo runs of the same distribution: bounds agree to Monte Carlo error.
    for name in ("accuracy", "accuracy_drop", "excess_accuracy_gap", "excessive_loss"):
        width = getattr(ours, name)[:, 1] - getattr(ours, name)[:, 0]
        assert np.allclose(getattr(ours, name), brute[name].T, atol=0.06 * width.max()), name
    assert np.allclose(ours.max_excess_accuracy_gap, brute["max"], atol=0.01)


def _brute_force_mean_quantiles(values: np.ndarray, resamples: int, quantiles, rng) -> np.ndarray:
    means = np.array([values[rng.integers(0, len(values), len(values))].mean() for _ in range(resamples)])
    return np.quantile(means, quantiles)


def _skewed_loss_differences(rng: np.random.Generator, n: int) -> np.ndarray:
    """Most examples barely change; three in ten lose a lot (exponential): skewness ≈ 3.6, excess kurtosis ≈ 17."""
    return np.where(rng.random(n) < 0.3, rng.exponential(1.0, n), rng.normal(0.0, 0.05, n))


@pytest.mark.parametrize("n", [ANALYTIC_MIN_GROUP, 20_000])
def test_cornish_fisher_quantiles_of_a_large_group_match_a_brute_force_bootstrap(n) -> None:
    values = _skewed_loss_differences(np.random.default_rng(n), n)
    quantiles = [0.025, 0.975]
    analytic = bootstrap_mean_quantiles(values, quantiles)
    assert analytic is not None
    brute = _brute_force_mean_quantiles(values, 60_000, quantiles, np.random.default_rng(7))
    standard_error = values.std() / np.sqrt(n)
    # Monte Carlo error of 60,000 resamples at these quantiles ≈ 0.011 SE; the expansion's is far smaller.
    assert np.abs(analytic - brute).max() < 0.04 * standard_error, (analytic, brute, standard_error)
    if n == ANALYTIC_MIN_GROUP:
        # There the skew shifts the quantiles by ≈ 0.04 SE: a plain normal interval misses it.
        normal = values.mean() + standard_error * np.array([-1.959964, 1.959964])
        assert np.abs(normal - brute).max() > 0.025 * standard_error > np.abs(analytic - brute).max()


def test_small_or_heavily_skewed_groups_are_resampled() -> None:
    rng = np.random.default_rng(0)
    assert bootstrap_mean_quantiles(_skewed_loss_differences(rng, ANALYTIC_MIN_GROUP - 1), [0.025, 0.975]) is None
    # One example in a thousand changes, by a lot: the bootstrap mean is far from normal at n = 5,000.
    rare = np.where(rng.random(5_000) < 0.001, 10.0, 0.0)
    assert bootstrap_mean_quantiles(rare, [0.025, 0.975]) is None
    constant = np.full(5_000, 0.25)
    assert np.array_equal(bootstrap_mean_quantiles(constant, [0.025, 0.975]), [0.25, 0.25])


def test_a_large_groups_excessive_loss_interval_matches_a_brute_force_index_bootstrap() -> None:
    rng = np.random.default_rng(5)
    n = 6_000
    codes = np.repeat([0, 1], [n, 300])  # one large group (expansion), one small (resampled)
    d = np.concatenate([_skewed_loss_differences(rng, n), rng.exponential(0.5, 300)])
    correct = rng.random(n + 300) < 0.8
    ours = bootstrap_group_intervals(correct, correct, np.zeros(n + 300), d, codes, resamples=4000, seed=1)
    # tolerances: the Monte Carlo error of the brute force (8,000 resamples), and of ours for the small group
    for group, values, tolerance in ((0, d[:n], 0.06), (1, d[n:], 0.2)):
        brute = _brute_force_mean_quantiles(values, 8000, [0.025, 0.975], np.random.default_rng(group))
        standard_error = values.std() / np.sqrt(len(values))
        assert np.allclose(ours.excessive_loss[group], brute, atol=tolerance * standard_error)


def test_intervals_are_deterministic_for_a_seed_and_contain_the_point_estimate() -> None:
    dense_correct, pruned_correct, dense_loss, pruned_loss, codes = _synthetic(np.random.default_rng(5))
    first = bootstrap_group_intervals(dense_correct, pruned_correct, dense_loss, pruned_loss, codes, seed=11)
    again = bootstrap_group_intervals(dense_correct, pruned_correct, dense_loss, pruned_loss, codes, seed=11)
    other = bootstrap_group_intervals(dense_correct, pruned_correct, dense_loss, pruned_loss, codes, seed=12)
    for field in (
        "dense_accuracy",
        "accuracy",
        "accuracy_drop",
        "excess_accuracy_gap",
        "excessive_loss",
        "max_excess_accuracy_gap",
    ):
        assert np.array_equal(getattr(first, field), getattr(again, field))
        assert not np.array_equal(getattr(first, field), getattr(other, field))
    assert first.resamples == 1000 and first.seed == 11 and first.groups.tolist() == [0, 1, 2]

    # Through attribute_metrics: every interval holds its point estimate, and is ordered.
    outcomes = [
        Outcomes(pred=np.zeros(len(codes)), correct=correct, loss=loss)
        for correct, loss in ((dense_correct, dense_loss), (pruned_correct, pruned_loss))
    ]
    result = attribute_metrics("g", *outcomes, codes, ["a", "b", "c"], bootstrap_resamples=1000, seed=11)
    aggregates = result.aggregates
    assert aggregates.bootstrap_resamples == 1000 and aggregates.bootstrap_seed == 11
    for group in result.groups:
        for field in ("dense_accuracy", "accuracy", "accuracy_drop", "excess_accuracy_gap", "excessive_loss"):
            low, high = getattr(group.confidence_intervals, f"{field}_ci")
            assert low <= getattr(group, field) <= high, (group.group, field)
    low, high = aggregates.max_excess_accuracy_gap_ci
    assert low <= high and high >= aggregates.max_excess_accuracy_gap
    json.dumps(result.model_dump(mode="json"), allow_nan=False)


def test_resamples_are_stratified_and_rows_without_a_group_count_in_the_overall_drop() -> None:
    rng = np.random.default_rng(6)
    codes = np.repeat([0, 1, -1], [50, 70, 200])
    # Inside each group every example is alike, so a within-group resample cannot move its numbers ...
    dense_correct = np.r_[np.ones(50, bool), np.ones(70, bool), rng.random(200) < 0.5]
    pruned_correct = np.r_[np.zeros(50, bool), np.ones(70, bool), rng.random(200) < 0.5]
    dense_loss = np.r_[np.full(50, 0.2), np.full(70, 0.3), rng.random(200)]
    pruned_loss = np.r_[np.full(50, 0.9), np.full(70, 0.3), rng.random(200)]
    intervals = bootstrap_group_intervals(dense_correct, pruned_correct, dense_loss, pruned_loss, codes, seed=0)
    assert intervals.accuracy.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert intervals.accuracy_drop.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert np.allclose(intervals.excessive_loss, [[0.7, 0.7], [0.0, 0.0]], atol=1e-12)
    # ... but ψa = Δa − Δ moves with the rows that have no group, which are resampled too.
    gap_width = intervals.excess_accuracy_gap[:, 1] - intervals.excess_accuracy_gap[:, 0]
    assert (gap_width > 0.02).all()


def test_a_million_examples_stay_within_memory() -> None:
    rng = np.random.default_rng(7)
    n = 1_000_000
    codes = rng.integers(-1, 10, n)
    args = (rng.random(n) < 0.9, rng.random(n) < 0.8, rng.random(n), rng.random(n), codes)
    tracemalloc.start()
    intervals = bootstrap_group_intervals(*args, resamples=40, seed=0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # A (resamples × n) int64 index array alone would be 320 MB.
    assert peak < 150e6, peak / 1e6
    assert intervals.accuracy.shape == (10, 2)


def test_bootstrap_rejects_bad_input() -> None:
    data = _synthetic(np.random.default_rng(8))
    with pytest.raises(EngineError, match="at least 1 resample"):
        bootstrap_group_intervals(*data, resamples=0)
    with pytest.raises(EngineError, match="at least one example with a group"):
        bootstrap_group_intervals(*data[:4], np.full(len(data[4]), -1))
    with pytest.raises(EngineError, match="disagree on the number of examples"):
        bootstrap_group_intervals(data[0][:-1], *data[1:])


def test_spearman_matches_the_rank_formula_without_ties() -> None:
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=25), rng.normal(size=25)
    rank_a, rank_b = a.argsort().argsort(), b.argsort().argsort()
    expected = 1 - 6 * ((rank_a - rank_b) ** 2).sum() / (25 * (25**2 - 1))
    rho, reason = spearman(a, b)
    assert reason is None and rho == pytest.approx(expected, abs=1e-12)
    assert spearman(a, a) == (pytest.approx(1.0), None)
    assert spearman(a, -a) == (pytest.approx(-1.0), None)


def test_spearman_is_undefined_with_a_reason() -> None:
    assert spearman([1.0, 2.0], [3.0, 4.0]) == (None, "needs at least 3 pairs with both values finite, got 2")
    rho, reason = spearman([1.0, None, 3.0, np.nan, 5.0], [2.0, 1.0, np.inf, 4.0, 0.0])
    assert rho is None and "got 2" in reason  # pairs with a missing or infinite value are left out
    rho, reason = spearman([1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0])
    assert rho is None and reason == "the second input is constant over the 4 pairs; rank correlation is undefined"
    rho, reason = spearman([1.0, None, 3.0, 4.0, 2.0], [1.0, 9.0, 2.0, 4.0, 3.0])
    assert reason is None and rho == pytest.approx(0.8)  # over the 4 complete pairs
    with pytest.raises(EngineError, match="same length"):
        spearman([1.0, 2.0, 3.0], [1.0, 2.0])
