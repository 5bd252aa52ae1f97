"""Statistical hygiene for the per-group report (docs/METHODS.md §8, §13): bootstrap 95% percentile intervals per group
for the dense and pruned accuracy, the accuracy drop Δa, the excess accuracy gap ψa and the excessive loss
R(a), an interval for max_a ψa; and Spearman's rank correlation with a reason where it is undefined.

The bootstrap works on cached per-example outcomes (correctness and loss of both models): it never runs a
model. It is paired (dense and pruned outcomes of an example are drawn together) and stratified (every
resample redraws exactly n_a examples within each group a, and the examples without a group are redrawn
within their own stratum, so the overall drop Δ in ψa = Δa − Δ is recomputed on the same resample).

Drawing, and why it is memory-safe at 1,000,000 examples × 1,000 resamples:

* Accuracy, Δa, Δ, ψa and max ψa depend on an example only through its pair (dense correct, pruned
  correct), one of 4 categories. Resampling n_s examples of a stratum with replacement and counting the
  categories IS a draw from Multinomial(n_s, category frequencies of the stratum): so these statistics are
  drawn as (resamples × strata × 4) multinomial counts, exactly the distribution of index resampling, in
  O(resamples × strata) time and memory, whatever n is. All strata are drawn in the same resample, so ψa and
  max ψa see the same Δ as each Δa.
* R(a) is the mean of the continuous paired difference d_i = loss_s(i) − loss_d(i) over the resample, which
  no small set of categories summarises, so it resamples indices within each group, in chunks of at most
  2**22 draws (a 16 MB int32 index block and its 16 MB of gathered values) rather than a
  (resamples × n) array. The draws for R(a) are separate from the category counts above; each interval is
  a marginal percentile interval, which depends only on that statistic's own bootstrap distribution, and
  that distribution is exactly the index-resampling one for both parts. (Only the joint distribution of,
  say, R(a) with Δa differs, and no reported number uses it.) Cost: about 5e-9 s per draw, so ~5 s for
  1,000 resamples of 1,000,000 grouped examples on one core.
* Large groups skip those draws: the bootstrap distribution of a mean of n draws from the group's n values has
  known cumulants (κ2 = m2/n, κ3 = m3/n², κ4 = (m4 − 3m2²)/n³, m_k the group's central moments), so its
  quantiles follow from the Cornish–Fisher expansion to second order. Used when n ≥ ANALYTIC_MIN_GROUP and the
  standardised skewness and excess kurtosis of that distribution are at most ANALYTIC_MAX_SHAPE in size, where
  the expansion's error (third order: ~|γ1|³ and |γ1·γ2| in units of the bootstrap SE) is far below the Monte
  Carlo error of 1,000 resamples (≈ 0.085 SE at the 2.5% quantile): the quantiles of the distribution the
  resampling only samples. Otherwise the indices are resampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from worker.engine.errors import EngineError

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
_CHUNK_DRAWS = 1 << 22  # index draws per block when resampling losses
ANALYTIC_MIN_GROUP = 2_000
ANALYTIC_MAX_SHAPE = 0.1


@dataclass(frozen=True)
class GroupIntervals:
    """Percentile intervals; each per-group array has shape (groups, 2) = (low, high), rows in the order of
    `groups` (the codes that have examples, ascending)."""

    groups: np.ndarray  # int64 group codes
    resamples: int
    seed: int
    confidence: float
    dense_accuracy: np.ndarray
    accuracy: np.ndarray  # pruned model
    accuracy_drop: np.ndarray  # Δa
    excess_accuracy_gap: np.ndarray  # ψa = Δa − Δ, Δ recomputed on the same resample
    excessive_loss: np.ndarray  # R(a)
    max_excess_accuracy_gap: np.ndarray  # shape (2,): interval of max_a ψa


def bootstrap_group_intervals(
    dense_correct: np.ndarray,
    pruned_correct: np.ndarray,
    dense_loss: np.ndarray,
    pruned_loss: np.ndarray,
    codes: np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> GroupIntervals:
    """Paired, group-stratified percentile bootstrap of the per-group pruning metrics. `codes[i]` is example
    i's group (≥ 0) or −1 for no group; rows without a group are resampled too, for the overall Δ.
    Deterministic for a seed."""
    dense_correct, pruned_correct, d, codes = _checked_inputs(
        dense_correct, pruned_correct, dense_loss, pruned_loss, codes, resamples, confidence
    )
    n = len(codes)
    rng = np.random.default_rng(seed)
    groups, n_groups_sizes, stratum, n_strata = _strata(codes)
    n_groups = len(groups)
    category = 2 * dense_correct.astype(np.int64) + pruned_correct  # 0 ww, 1 wr, 2 rw, 3 rr (dense, pruned)
    category_counts = np.bincount(stratum * 4 + category, minlength=n_strata * 4).reshape(n_strata, 4)
    stratum_sizes = category_counts.sum(axis=1)

    # (resamples, strata, 4) category counts; one vectorised multinomial call.
    drawn = rng.multinomial(stratum_sizes, category_counts / stratum_sizes[:, None], size=(resamples, n_strata))
    dense_right = drawn[..., 2] + drawn[..., 3]
    pruned_right = drawn[..., 1] + drawn[..., 3]
    dense_accuracy = dense_right[:, :n_groups] / n_groups_sizes
    accuracy = pruned_right[:, :n_groups] / n_groups_sizes
    drop = dense_accuracy - accuracy
    overall_drop = (dense_right.sum(axis=1) - pruned_right.sum(axis=1)) / n
    gap = drop - overall_drop[:, None]
    tail = (1 - confidence) / 2
    quantiles = [tail, 1 - tail]
    # Drawn after the multinomial above, from the same Generator: the order of the draws is part of the seed's result.
    excessive_loss = _excessive_loss_intervals(rng, d, stratum, n_groups_sizes, resamples, quantiles)

    def interval(samples: np.ndarray) -> np.ndarray:
        return np.quantile(samples, quantiles, axis=0).T

    return GroupIntervals(
        groups=groups,
        resamples=resamples,
        seed=seed,
        confidence=confidence,
        dense_accuracy=interval(dense_accuracy),
        accuracy=interval(accuracy),
        accuracy_drop=interval(drop),
        excess_accuracy_gap=interval(gap),
        excessive_loss=excessive_loss,
        max_excess_accuracy_gap=np.quantile(gap.max(axis=1), quantiles),
    )


def _checked_inputs(
    dense_correct: np.ndarray,
    pruned_correct: np.ndarray,
    dense_loss: np.ndarray,
    pruned_loss: np.ndarray,
    codes: np.ndarray,
    resamples: int,
    confidence: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(dense_correct, pruned_correct, pruned − dense loss, codes) as bool, bool, float64, int64, checked."""
    dense_correct = np.asarray(dense_correct, dtype=bool)
    pruned_correct = np.asarray(pruned_correct, dtype=bool)
    d = np.asarray(pruned_loss, dtype=np.float64) - np.asarray(dense_loss, dtype=np.float64)
    codes = np.asarray(codes, dtype=np.int64)
    n = len(codes)
    if not (len(dense_correct) == len(pruned_correct) == len(d) == n):
        raise EngineError("bootstrap inputs disagree on the number of examples")
    if resamples < 1:
        raise EngineError(f"the bootstrap needs at least 1 resample, got {resamples}")
    if not 0 < confidence < 1:
        raise EngineError(f"confidence must be between 0 and 1, got {confidence}")
    if n == 0 or codes.max(initial=-1) < 0:
        raise EngineError("the bootstrap needs at least one example with a group")
    if not np.isfinite(d).all():
        raise EngineError("bootstrap losses contain NaN or infinite values")
    return dense_correct, pruned_correct, d, codes


def _strata(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Strata: the groups with examples in code order, then the rows without a group (if any). Returns the
    groups' codes, their sizes, each row's stratum and the number of strata."""
    has_group = codes >= 0
    sizes = np.bincount(codes[has_group])
    groups = np.flatnonzero(sizes)
    n_groups = len(groups)
    stratum_of_code = np.zeros(len(sizes), dtype=np.int64)
    stratum_of_code[groups] = np.arange(n_groups)
    stratum = np.full(len(codes), n_groups, dtype=np.int64)
    stratum[has_group] = stratum_of_code[codes[has_group]]
    return groups, sizes[groups], stratum, n_groups + int((~has_group).any())


def _excessive_loss_intervals(
    rng: np.random.Generator,
    d: np.ndarray,
    stratum: np.ndarray,
    group_sizes: np.ndarray,
    resamples: int,
    quantiles: list[float],
) -> np.ndarray:
    """(groups, 2) percentile intervals of the bootstrap mean of the per-example loss differences `d` within
    each group (strata 0..groups−1 of `stratum`): from the Cornish–Fisher expansion for a large group, else
    from index resamples drawn group by group in blocks of at most _CHUNK_DRAWS indices."""
    intervals = np.empty((len(group_sizes), 2))
    order = np.argsort(stratum, kind="stable")
    starts = np.concatenate(([0], np.cumsum(group_sizes)))
    for g in range(len(group_sizes)):
        values = d[order[starts[g] : starts[g + 1]]]
        analytic = bootstrap_mean_quantiles(values, quantiles)
        if analytic is None:
            analytic = np.quantile(_resampled_means(rng, values, resamples), quantiles)
        intervals[g] = analytic
    return intervals


def bootstrap_mean_quantiles(values: np.ndarray, quantiles: list[float]) -> np.ndarray | None:
    """Quantiles of the bootstrap distribution of the mean of `values` by its second-order Cornish–Fisher
    expansion (exact cumulants); None where the group is small or skewed enough that resampling is better."""
    n = len(values)
    if n < ANALYTIC_MIN_GROUP:
        return None
    center = float(values.mean())
    deviations = values - center
    m2 = float(np.mean(deviations**2))
    if m2 == 0.0:
        return np.full(len(quantiles), center)
    m3, m4 = float(np.mean(deviations**3)), float(np.mean(deviations**4))
    skewness = m3 / (m2**1.5 * math.sqrt(n))
    excess_kurtosis = (m4 / m2**2 - 3.0) / n
    if max(abs(skewness), abs(excess_kurtosis)) > ANALYTIC_MAX_SHAPE:
        return None
    z = np.array([NormalDist().inv_cdf(q) for q in quantiles])
    w = z + (z**2 - 1) * skewness / 6 + (z**3 - 3 * z) * excess_kurtosis / 24 - (2 * z**3 - 5 * z) * skewness**2 / 36
    return center + math.sqrt(m2 / n) * w


def _resampled_means(rng: np.random.Generator, values: np.ndarray, resamples: int) -> np.ndarray:
    """`resamples` means of len(values) indices drawn with replacement, in blocks of at most _CHUNK_DRAWS."""
    size = len(values)
    center = float(values.mean())
    # Centred float32 copy: half the memory traffic of the random gather, and the rounding error sits
    # on deviations from the mean (a constant group resamples to exactly its mean).
    centred = (values - center).astype(np.float32)
    index_dtype = np.int32 if size < 2**31 else np.int64
    per_block = max(1, _CHUNK_DRAWS // size)
    means = np.empty(resamples)
    for first in range(0, resamples, per_block):
        block = min(per_block, resamples - first)
        index = rng.integers(0, size, size=(block, size), dtype=index_dtype)
        means[first : first + block] = center + centred.take(index).sum(axis=1, dtype=np.float64) / size
    return means


def spearman(a, b) -> tuple[float | None, str | None]:
    """Spearman's rank correlation over the pairs where both values are finite (None counts as missing):
    (rho, None), or (None, reason) with fewer than 3 such pairs or a constant input."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise EngineError(f"spearman needs two 1-D sequences of the same length, got shapes {a.shape} and {b.shape}")
    finite = np.isfinite(a) & np.isfinite(b)
    pairs = int(finite.sum())
    if pairs < 3:
        return None, f"needs at least 3 pairs with both values finite, got {pairs}"
    a, b = a[finite], b[finite]
    for which, values in (("first", a), ("second", b)):
        if values.min() == values.max():
            return None, f"the {which} input is constant over the {pairs} pairs; rank correlation is undefined"
    from scipy.stats import spearmanr  # scipy.stats takes a while to import; only diagnostics need it

    rho = float(spearmanr(a, b).statistic)
    if not math.isfinite(rho):
        return None, f"rank correlation is not finite over the {pairs} pairs"
    return rho, None
