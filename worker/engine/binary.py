"""Binary tasks (class 1 positive, Fairlearn's default pos_label): per-group selection rate, true and false
positive rates from confusion counts, and Fairlearn's between-groups aggregates (demographic parity difference and
ratio, equalized odds difference, worst case). Definitions: docs/METHODS.md §7."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.engine.group_table import GroupTable, floats
from worker.engine.groupings import spread, too_few_groups

POSITIVE_CLASS = 1  # binary tasks: class index 1 is the positive label (Fairlearn's default pos_label)
BINARY_AGGREGATES = ("demographic_parity_difference", "demographic_parity_ratio", "equalized_odds_difference")


@dataclass(frozen=True)
class GroupRateArrays:
    """Per-group rates of a binary task from confusion counts (G, 2, 2); NaN marks an undefined rate
    (internal only: the group results turn it into None with a reason)."""

    selection_rate: np.ndarray
    true_positive_rate: np.ndarray
    false_positive_rate: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray


def binary_rates(confusion: np.ndarray) -> GroupRateArrays:
    """Selection rate, TPR and FPR of every group from its confusion counts (G, 2, 2), rows = true class."""
    positives = confusion[:, 1, :].sum(axis=1)
    negatives = confusion[:, 0, :].sum(axis=1)
    n = positives + negatives
    selected = confusion[:, :, POSITIVE_CLASS].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return GroupRateArrays(
            selection_rate=selected / n,
            true_positive_rate=np.where(positives > 0, confusion[:, 1, 1] / positives, np.nan),
            false_positive_rate=np.where(negatives > 0, confusion[:, 0, 1] / negatives, np.nan),
            positives=positives,
            negatives=negatives,
        )


def add_binary_rates(
    table: GroupTable,
    attribute: str,
    num_classes: int | None,
    confusions: dict[str, np.ndarray],
    label_reason: str | None,
) -> tuple[dict[str, float | None], dict[str, str], dict[str, str]]:
    """Per-group selection rate, TPR and FPR of each model, and the attribute's binary aggregates:
    (values, reasons for the None ones, caveats)."""
    values: dict[str, float | None] = {}
    undefined: dict[str, str] = {}
    caveats: dict[str, str] = {}
    if num_classes != 2 or not confusions:
        if num_classes is None:
            reason = "binary metrics need a 2-class task; number of classes unknown (pass num_classes)"
        elif num_classes != 2:
            reason = f"binary metrics need a 2-class task; this one has {num_classes} classes"
        else:
            reason = label_reason or "the confusion counts were left out (too many groups)"
        table.leave_out("binary_rates", reason)
        for prefix in ("dense_", ""):
            for field in BINARY_AGGREGATES:
                values[prefix + field] = None
                undefined[prefix + field] = reason
        return values, undefined, caveats
    group_names = table.group_names
    for prefix in ("dense_", ""):
        rates = binary_rates(confusions[prefix])
        table.columns[f"{prefix}selection_rate"] = floats(rates.selection_rate)
        for field, rate, denominator, what in (
            ("true_positive_rate", rates.true_positive_rate, rates.positives, "positive (class 1)"),
            ("false_positive_rate", rates.false_positive_rate, rates.negatives, "negative (class 0)"),
        ):
            table.columns[prefix + field] = floats(rate)
            for i in np.flatnonzero(denominator == 0):
                table.undefined[i][prefix + field] = f"group {group_names[i]} has no {what} examples"
        model_values, model_undefined, model_caveats = _binary_aggregates(attribute, group_names, rates)
        values |= {prefix + k: v for k, v in model_values.items()}
        undefined |= {prefix + k: v for k, v in model_undefined.items()}
        caveats |= {prefix + k: v for k, v in model_caveats.items()}
    return values, undefined, caveats


def _binary_aggregates(
    attribute: str, group_names: list[str], rates: GroupRateArrays
) -> tuple[dict[str, float | None], dict[str, str], dict[str, str]]:
    """Fairlearn's between-groups aggregates of one model: DP difference and ratio, EO difference (worst case).
    Where Fairlearn counts a group with no positives as TPR 0 (sklearn's zero-division rule), this leaves the
    group out of that rate's spread and says so in a caveat."""
    values: dict[str, float | None] = {}
    undefined: dict[str, str] = {}
    caveats: dict[str, str] = {}
    if len(group_names) < 2:
        reason = too_few_groups(attribute, group_names, 2)
        return dict.fromkeys(BINARY_AGGREGATES), dict.fromkeys(BINARY_AGGREGATES, reason), {}
    selection = rates.selection_rate
    values["demographic_parity_difference"] = spread(selection)
    if selection.max() > 0:
        values["demographic_parity_ratio"] = float(selection.min() / selection.max())
    else:
        values["demographic_parity_ratio"] = None
        undefined["demographic_parity_ratio"] = f"no group of {attribute} has any positive prediction (0/0)"
    spreads: dict[str, float] = {}
    problems: list[str] = []
    notes: list[str] = []
    for short, rate, what in (
        ("TPR", rates.true_positive_rate, "positive"),
        ("FPR", rates.false_positive_rate, "negative"),
    ):
        defined = ~np.isnan(rate)
        left_out = ", ".join(group_names[i] for i in np.flatnonzero(~defined))
        if defined.sum() < 2:
            problems.append(f"{short} is defined for fewer than 2 groups (groups without {what} examples: {left_out})")
        else:
            spreads[short] = spread(rate[defined])
            if left_out:
                notes.append(
                    f"{short} spread over {int(defined.sum())} of {len(group_names)} groups; left out "
                    f"(no {what} examples; Fairlearn would count their {short} as 0): {left_out}"
                )
    if notes:
        caveats["equalized_odds_difference"] = "; ".join(notes)
    if problems:
        values["equalized_odds_difference"] = None
        undefined["equalized_odds_difference"] = "; ".join(problems)
    else:
        values["equalized_odds_difference"] = max(spreads.values())
    return values, undefined, caveats
