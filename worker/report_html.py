"""The HTML report for people: one self-contained page rendered from the report JSON (`AuditReport` dumped in
JSON mode, with the policy verdict). Inline CSS, plots as inline SVG drawn by matplotlib, no script and no
reference to anything outside the page, so it opens offline, in a mail attachment or printed.

The worker renders it once when an audit succeeds; the web process only serves the stored bytes and never
imports this module (matplotlib stays out of the HTTP process).

Every number on the page is a JSON value passed through one of the formatters below; nothing shown is
recomputed from other numbers, so the page cannot disagree with the JSON or the CSV:

    fraction   accuracy, share, achieved sparsity, flip rates    f"{v * 100:.1f}%"        0.9444 → "94.4%"
    points     Δa, ψ, overall drop, fairness violations,         f"{v * 100:.1f}"         0.0525 → "5.2"
               policy values and thresholds (percentage points)
    ratio      the requested pruning ratio                       f"{v * 100:g}%"          0.9 → "90%"
    number     losses, R(a), R̂(a), gradient norms, curvature,    f"{v:.4g}"               0.012345 → "0.01235"
               boundary proximity, logit margin
    rho        Spearman ρ                                        f"{v:+.2f}"              -0.5 → "-0.50"
    count      n, flips, parameters, MACs, bytes                 f"{v:,}"                 12345 → "12,345"
    times      compression ratios (dense / pruned)               f"{v:.2f}×"
    ms         latency (seconds in the JSON)                     f"{v * 1000:.3g} ms"
    interval   a CI [lo, hi]                                     f"[{f(lo)}, {f(hi)}]", f the field's format

"-0.0" and "-0.0%" are shown without the sign. null (or a missing field) is shown as "—".
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from matplotlib.figure import Figure

TEMPLATES = Path(__file__).resolve().parent / "templates"
MISSING = "—"
# Matplotlib settings for every figure, applied in a context (the process's rcParams stay as they are).
# svg.fonttype "none": text stays text (small, selectable, printed sharp) in the browser's sans-serif font.
# svg.hashsalt: stable element ids, so the same report renders to the same bytes.
STYLE = {
    "svg.fonttype": "none",
    "svg.hashsalt": "pruneaudit",
    "font.family": "sans-serif",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "legend.frameon": False,
}
PANEL_WIDTH_IN = 4.4
MAX_PANELS_PER_ROW = 3


# ---------------------------------------------------------------------------------------------- formatting


def _unsigned_zero(text: str) -> str:
    return text[1:] if re.fullmatch(r"-0(\.0*)?%?", text) else text


def _formatter(spec: Callable[[Any], str]) -> Callable[[Any], str]:
    def format_value(value: Any) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return MISSING
        return _unsigned_zero(spec(value))

    return format_value


fraction = _formatter(lambda v: f"{v * 100:.1f}%")
points = _formatter(lambda v: f"{v * 100:.1f}")
ratio = _formatter(lambda v: f"{v * 100:g}%")
number = _formatter(lambda v: f"{v:.4g}")
rho = _formatter(lambda v: f"{v:+.2f}")
count = _formatter(lambda v: f"{int(v):,}")
times = _formatter(lambda v: f"{v:.2f}×")
ms = _formatter(lambda v: f"{v * 1000:.3g} ms")


def interval(value: Any, fmt: Callable[[Any], str]) -> str:
    if not value or len(value) != 2 or any(v is None for v in value):
        return MISSING
    return f"[{fmt(value[0])}, {fmt(value[1])}]"


def _get(mapping: Any, *path: str) -> Any:
    """mapping[path[0]][path[1]]…, None where any step is missing or null."""
    for key in path:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------ report shape


class _Shape:
    """Index of the report: methods in order of appearance, runs per method by ratio, attributes and groups."""

    def __init__(self, report: dict):
        self.report = report
        self.dense: dict = report.get("dense") or {}
        self.runs: list[dict] = list(report.get("runs") or [])
        self.methods: list[str] = []
        for run in self.runs:
            if run.get("label") not in self.methods:
                self.methods.append(run.get("label"))
        self.by_method = {m: sorted((r for r in self.runs if r.get("label") == m), key=lambda r: r.get("ratio", 0))
                          for m in self.methods}
        self.attributes: list[str] = []
        for run in [self.dense, *self.runs]:
            for attribute in run.get("attributes") or []:
                if attribute.get("attribute") not in self.attributes:
                    self.attributes.append(attribute.get("attribute"))
        self.policy: dict = report.get("policy") or {}

    def attribute(self, run: dict, name: str) -> dict | None:
        return next((a for a in run.get("attributes") or [] if a.get("attribute") == name), None)

    def groups(self, name: str) -> list[str]:
        order: list[str] = []
        for run in [self.dense, *self.runs]:
            for row in (self.attribute(run, name) or {}).get("groups") or []:
                if row.get("group") not in order:
                    order.append(row.get("group"))
        return order

    def row(self, run: dict, name: str, group: str) -> dict | None:
        attribute = self.attribute(run, name) or {}
        return next((g for g in attribute.get("groups") or [] if g.get("group") == group), None)

    def dense_row(self, name: str, group: str) -> dict:
        """The group's row in the dense run, else in the first run that has it (dense_* fields are the same)."""
        for run in [self.dense, *self.runs]:
            row = self.row(run, name, group)
            if row is not None:
                return row
        return {}

    @staticmethod
    def base_method(run: dict) -> str:
        """The pruning method's label without the mitigation ('magnitude-global+ceag' → 'magnitude-global')."""
        return str(run.get("label")).split("+")[0]

    @staticmethod
    def mitigation(run: dict) -> str:
        return str(run.get("label")).partition("+")[2] or "none"

    def base_methods(self) -> list[str]:
        """Pruning methods that have mitigated runs, in order of appearance."""
        mitigated = {self.base_method(r) for r in self.runs if self.mitigation(r) != "none"}
        return [m for m in dict.fromkeys(self.base_method(r) for r in self.runs) if m in mitigated]

    def mitigations(self) -> list[str]:
        return list(dict.fromkeys(["none", *(self.mitigation(r) for r in self.runs)]))

    def split_attribute(self, run: dict, name: str, split: str) -> dict | None:
        attributes = run.get("attributes") if split == "eval" else _get(run, "train", "attributes")
        return next((a for a in attributes or [] if a.get("attribute") == name), None)

    def max_gap(self, run: dict, name: str, split: str) -> Any:
        return _get(self.split_attribute(run, name, split), "aggregates", "max_excess_accuracy_gap")

    def dense_figure(self, name: str, group: str, section: str, field: str) -> Any:
        """A dense_* figure of the group: the dense run's value, else the first run's that is not null."""
        for run in [self.dense, *self.runs]:
            value = _get(self.row(run, name, group), section, field)
            if value is not None:
                return value
        return None


# ----------------------------------------------------------------------------------------------- plots


def _label(text: Any) -> str:
    """Group names are data: keep matplotlib's mathtext from reading '$' in them."""
    return str(text).replace("$", r"\$")


def _colors(n: int) -> list:
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    if n <= 20:
        return [cmap(i) for i in range(n)]
    return [matplotlib.colormaps["turbo"](i / max(n - 1, 1)) for i in range(n)]


MARKERS = "osD^v<>ph*"


def _svg(fig: Figure, prefix: str) -> Markup:
    """The figure as an inline <svg> element: no XML prolog, DOCTYPE (it names an outside DTD), namespace
    URIs or metadata, and every id prefixed so several SVGs on one page never share an id."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.DOTALL)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}-{m.group(1)}"', text)
    text = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}-{m.group(1)})", text)
    text = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}-{m.group(1)}"', text)
    text = re.sub(r"<svg\b", '<svg role="img" focusable="false"', text, count=1)
    return Markup(text.strip())


def _panel_width(panels: int) -> float:
    return PANEL_WIDTH_IN if panels > 1 else 6.0


def _panels(n: int, height: float, extra_width: float = 1.6,
            panel_width: float = PANEL_WIDTH_IN) -> tuple[Figure, list]:
    cols = max(1, min(n, MAX_PANELS_PER_ROW))
    rows = math.ceil(max(n, 1) / cols)
    fig = Figure(figsize=(panel_width * cols + extra_width, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:max(n, 1)]


def _legend(fig: Figure, handles: list, labels: list, title: str) -> None:
    if handles:
        fig.legend(handles, labels, loc="outside right upper", title=title, ncols=1 if len(labels) <= 16 else 2)


class _Plots:
    def __init__(self, shape: _Shape):
        self.shape = shape
        self.count = 0

    def render(self, build: Callable[[str], Figure | None], attribute: str) -> Markup | None:
        with matplotlib.rc_context(STYLE):
            fig = build(attribute)
            if fig is None:
                return None
            self.count += 1
            return _svg(fig, f"fig{self.count}")

    # Per-group accuracy as sparsity grows: the dense model at ratio 0, one line per group, one panel per method.
    def accuracy_curves(self, attribute: str) -> Figure | None:
        shape, groups = self.shape, self.shape.groups(attribute)
        if not shape.methods or not groups:
            return None
        fig, axes = _panels(len(shape.methods), 3.4, panel_width=_panel_width(len(shape.methods)))
        colors = _colors(len(groups))
        handles: list = []
        for ax, method in zip(axes, shape.methods):
            runs = shape.by_method[method]
            for i, group in enumerate(groups):
                xs, ys = [], []
                dense_accuracy = _get(shape.dense_row(attribute, group), "dense_accuracy")
                if _finite(dense_accuracy):
                    xs.append(0.0)
                    ys.append(dense_accuracy * 100)
                for run in runs:
                    value = _get(shape.row(run, attribute, group), "accuracy")
                    if _finite(value):
                        xs.append(run["ratio"] * 100)
                        ys.append(value * 100)
                (line,) = ax.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], markersize=4, color=colors[i],
                                  linewidth=1.4, label=_label(group))
                if ax is axes[0]:
                    handles.append(line)
            xs = [0.0] + [r["ratio"] * 100 for r in runs]
            ys = [_get(shape.dense, "overall", "accuracy")] + [_get(r, "overall", "accuracy") for r in runs]
            points_ = [(x, y * 100) for x, y in zip(xs, ys) if _finite(y)]
            (overall,) = ax.plot([p[0] for p in points_], [p[1] for p in points_], color="black", linestyle="--",
                                 linewidth=2, label="overall")
            if ax is axes[0]:
                handles.append(overall)
            ax.set_title(_label(method))
            ax.set_xlabel("pruning ratio (%); 0 = dense model")
            ax.set_ylabel("accuracy (%)")
            ax.set_xticks(xs)
        _legend(fig, handles, [h.get_label() for h in handles], _label(attribute))
        return fig

    def _grouped_bars(self, attribute: str, field: str, scale: float, ylabel: str,
                      hline: tuple[float, str] | None = None, markers_field: str | None = None,
                      negative_field: str | None = None) -> Figure | None:
        """One panel per method: for each group a bar per ratio (darker = higher ratio)."""
        shape, groups = self.shape, self.shape.groups(attribute)
        if not shape.methods or not groups:
            return None
        values = [_get(shape.row(run, attribute, g), *field.split(".")) for run in shape.runs for g in groups]
        if not any(_finite(v) for v in values):
            return None
        fig, axes = _panels(len(shape.methods), 3.2, extra_width=1.4,
                            panel_width=max(_panel_width(len(shape.methods)), 0.3 * len(groups) + 1.0))
        for ax, method in zip(axes, shape.methods):
            runs = shape.by_method[method]
            ax.set_xlim(-0.6, len(groups) - 0.4)
            cmap = matplotlib.colormaps["Blues"]
            bar_width = 0.8 / max(len(runs), 1)
            for j, run in enumerate(runs):
                shade = cmap(0.4 + 0.55 * (j + 1) / len(runs))
                offsets = [i - 0.4 + bar_width * (j + 0.5) for i in range(len(groups))]
                heights = [_get(shape.row(run, attribute, g), *field.split(".")) for g in groups]
                ax.bar(offsets, [h * scale if _finite(h) else 0 for h in heights], bar_width, color=shade,
                       label=ratio(run["ratio"]))
                if negative_field:
                    lows = [_get(shape.row(run, attribute, g), *negative_field.split(".")) for g in groups]
                    ax.bar(offsets, [-v * scale if _finite(v) else 0 for v in lows], bar_width, color=shade,
                           hatch="///", edgecolor="white", linewidth=0)
                if markers_field:
                    predicted = [_get(shape.row(run, attribute, g), *markers_field.split(".")) for g in groups]
                    kept = [(o, p * scale) for o, p in zip(offsets, predicted) if _finite(p)]
                    if kept:
                        ax.scatter([k[0] for k in kept], [k[1] for k in kept], marker="D", s=14, color="#c0392b",
                                   zorder=3, label="R̂(a) predicted")
            ax.axhline(0, color="black", linewidth=0.8)
            if hline is not None:
                ax.axhline(hline[0], color="#c0392b", linestyle="--", linewidth=1.2, label=hline[1])
            ax.set_xticks(range(len(groups)), [_label(g) for g in groups],
                          rotation=45 if max(len(str(g)) for g in groups) > 3 else 0,
                          ha="right" if max(len(str(g)) for g in groups) > 3 else "center")
            ax.grid(axis="x", visible=False)
            ax.set_title(_label(method))
            ax.set_ylabel(ylabel)
            ax.set_xlabel(_label(attribute))
        handles: dict[str, Any] = {}
        for ax in axes:
            for handle, text in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(text, handle)
        _legend(fig, list(handles.values()), list(handles), "pruning ratio")
        return fig

    def gap_bars(self, attribute: str) -> Figure | None:
        epsilon = self.shape.policy.get("max_excess_accuracy_gap")
        hline = (epsilon * 100, f"ε = {points(epsilon)} points") if _finite(epsilon) else None
        return self._grouped_bars(attribute, "excess_accuracy_gap", 100,
                                  "excess accuracy gap ψ (points)", hline=hline)

    def loss_bars(self, attribute: str) -> Figure | None:
        return self._grouped_bars(attribute, "excessive_loss", 1, "excessive loss R(a)",
                                  markers_field="diagnostics.predicted_excessive_loss")

    def flip_bars(self, attribute: str) -> Figure | None:
        return self._grouped_bars(attribute, "flips.flips_correct_to_wrong_rate", 100,
                                  "flips (% of group)\n↑ right→wrong   ↓ wrong→right (hatched)",
                                  negative_field="flips.flips_wrong_to_correct_rate")

    def group_sizes(self, attribute: str) -> Figure | None:
        shape, groups = self.shape, self.shape.groups(attribute)
        sizes = [_get(shape.dense_row(attribute, g), "n") for g in groups]
        if not any(_finite(n) for n in sizes):
            return None
        small = [bool(_get(shape.dense_row(attribute, g), "small_group")) for g in groups]
        fig = Figure(figsize=(8.5, max(1.8, 0.28 * len(groups) + 1.0)), layout="constrained")
        ax = fig.subplots()
        ax.barh(range(len(groups)), [n if _finite(n) else 0 for n in sizes],
                color=["#e67e22" if s else "#4a78b5" for s in small])
        ax.set_yticks(range(len(groups)), [_label(g) + ("  (small)" if s else "") for g, s in zip(groups, small)])
        ax.invert_yaxis()
        minimum = shape.policy.get("min_group_size")
        if minimum is None:
            minimum = _get(shape.attribute(shape.dense, attribute), "aggregates", "min_group_size")
        if _finite(minimum):
            ax.axvline(minimum, color="#c0392b", linestyle="--", linewidth=1.2,
                       label=f"minimum group size {count(minimum)}")
            fig.legend(loc="outside right upper")
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("examples (n)")
        ax.set_title(f"group sizes — {_label(attribute)}")
        return fig

    def _scatter(self, attribute: str, x_of: Callable[[str], Any], y_of: Callable[[str], Any],
                 xlabel: str, ylabel: str, title: str) -> Figure | None:
        groups = self.shape.groups(attribute)
        pts = [(g, x_of(g), y_of(g)) for g in groups]
        pts = [p for p in pts if _finite(p[1]) and _finite(p[2])]
        if not pts:
            return None
        colors = _colors(len(groups))
        fig = Figure(figsize=(6.2, 4.2), layout="constrained")
        ax = fig.subplots()
        for g, x, y in pts:
            i = groups.index(g)
            ax.scatter([x], [y], color=colors[i], marker=MARKERS[i % len(MARKERS)], s=40, zorder=3)
            ax.annotate(_label(g), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8)
        xs = [p[1] for p in pts]
        if min(xs) > 0 and max(xs) / min(xs) > 30:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        return fig

    def gradient_vs_size(self, attribute: str) -> Figure | None:
        shape = self.shape
        return self._scatter(
            attribute,
            lambda g: _get(shape.dense_row(attribute, g), "n"),
            lambda g: shape.dense_figure(attribute, g, "diagnostics", "dense_gradient_norm"),
            "group size n", "dense gradient norm ‖∇J_a(θd)‖", "gradient norm vs group size",
        )

    def curvature_vs_boundary(self, attribute: str) -> Figure | None:
        shape = self.shape
        return self._scatter(
            attribute,
            lambda g: shape.dense_figure(attribute, g, "boundary", "dense_boundary_proximity"),
            lambda g: shape.dense_figure(attribute, g, "diagnostics", "dense_hessian_trace"),
            "dense boundary proximity, mean p_y(1 − p_y) (higher = nearer)",
            "dense Hessian trace Tr H_a", "curvature vs distance to the decision boundary",
        )


    def mitigation_curves(self, attribute: str) -> Figure | None:
        """Max ψ vs ratio, one line per mitigation ('none' included): per pruning method, the evaluation split
        and the train split side by side (Balancing Act: gains on the train split may not carry over)."""
        shape = self.shape
        bases = shape.base_methods()
        if not bases:
            return None
        fig, axes = _panels(2 * len(bases), 3.2, panel_width=PANEL_WIDTH_IN)
        mitigations = shape.mitigations()
        colors = _colors(len(mitigations))
        epsilon = shape.policy.get("max_excess_accuracy_gap")
        for k, base in enumerate(bases):
            for ax, split in zip(axes[2 * k:2 * k + 2], ("eval", "train")):
                for i, mitigation in enumerate(mitigations):
                    runs = [r for r in shape.runs if shape.base_method(r) == base and shape.mitigation(r) == mitigation]
                    points_ = [(r["ratio"] * 100, value * 100) for r in sorted(runs, key=lambda r: r["ratio"])
                               for value in [shape.max_gap(r, attribute, split)] if _finite(value)]
                    if points_:
                        ax.plot([p[0] for p in points_], [p[1] for p in points_], marker=MARKERS[i % len(MARKERS)],
                                color=colors[i], linewidth=1.6 if mitigation != "none" else 2.2,
                                linestyle="-" if mitigation != "none" else ":", label=_label(mitigation))
                if _finite(epsilon):
                    ax.axhline(epsilon * 100, color="#c0392b", linestyle="--", linewidth=1.2,
                               label=f"ε = {points(epsilon)} points")
                ax.axhline(0, color="black", linewidth=0.8)
                # Unmitigated gaps are often tens of points and mitigated ones a few: a linear axis hides the latter.
                ax.set_yscale("symlog", linthresh=1.0)
                ax.set_title(_label(f"{base} — {'evaluation' if split == 'eval' else 'train'} split"))
                ax.set_xlabel("pruning ratio (%)")
                ax.set_ylabel("max excess accuracy gap ψ (points, symlog)")
        handles: dict[str, Any] = {}
        for ax in axes:
            for handle, text in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(text, handle)
        _legend(fig, list(handles.values()), list(handles), "mitigation")
        return fig


# ------------------------------------------------------------------------------------------- paragraph


def _rank(values: dict[str, Any], group: str) -> tuple[int, int] | None:
    """(rank of the group's value, 1 = largest; number of groups with a value), or None without one."""
    known = {g: v for g, v in values.items() if _finite(v)}
    if group not in known:
        return None
    return 1 + sum(1 for v in known.values() if v > known[group]), len(known)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _rank_words(what: str, value: Any, rank: tuple[int, int] | None, fmt: Callable[[Any], str]) -> str:
    if rank is None:
        return f"its {what} was not computed"
    position, total = rank
    if position == 1:
        return f"its {what} ({fmt(value)}) is the largest of all {total} groups, which the paper ties to this harm"
    if position <= math.ceil(total / 4):
        return (f"its {what} ({fmt(value)}) is the {_ordinal(position)} largest of {total} groups, in the top "
                "quartile, which the paper ties to this harm")
    return (f"its {what} ({fmt(value)}) is only the {_ordinal(position)} largest of {total} groups, so it does not "
            "single this group out")


SPEARMAN = {
    # key: (expected sign, sentence when ρ has the expected sign, sentence otherwise)
    "size_vs_dense_gradient_norm": (
        -1, "smaller groups have larger dense gradient norms, as Tran et al.'s Proposition 1 expects",
        "group size and dense gradient norm do not fall together here, unlike Tran et al.'s Proposition 1"),
    "dense_gradient_norm_vs_dense_hessian_trace": (
        1, "groups with larger gradient norms also have more curvature, as in the paper's Figure 6",
        "gradient norm and curvature do not rise together here, unlike the paper's Figure 6"),
    "dense_accuracy_vs_accuracy_drop": (
        -1, "groups the dense model classified worse lose more accuracy",
        "the groups that lose the most are not those the dense model classified worst"),
    "predicted_vs_excessive_loss": (
        1, "the second-order prediction R̂(a) ranks the groups' excessive loss R(a) in the right order",
        "the second-order prediction R̂(a) does not rank the groups' excessive loss R(a) in the right order"),
}


def _strength(value: float) -> str:
    size = abs(value)
    return "strong" if size >= 0.7 else "moderate" if size >= 0.4 else "weak"


def spearman_sentences(diagnostics: dict | None, groups: int) -> list[str]:
    sentences = [f"Over the {groups} groups of this run:"]
    for key, (sign, agrees, disagrees) in SPEARMAN.items():
        item = (diagnostics or {}).get(key) or {}
        value = item.get("rho")
        if not _finite(value):
            reason = item.get("reason") or "not computed"
            sentences.append(f"the rank correlation of {key.replace('_', ' ')} is not available ({reason});")
            continue
        words = agrees if value * sign > 0 else disagrees
        sentences.append(f"{words} (Spearman ρ = {rho(value)}, {_strength(value)});")
    sentences[-1] = sentences[-1][:-1] + "."
    return sentences


def focus_run(shape: _Shape) -> tuple[dict, dict] | None:
    """The run to explain, and its attribute: the largest max ψ among runs that fail the policy, else among the
    runs at the highest ratio; within the run, the attribute with the largest max ψ."""
    def max_gap(run: dict) -> tuple[float, dict | None]:
        best: tuple[float, dict | None] = (-math.inf, None)
        for attribute in run.get("attributes") or []:
            value = _get(attribute, "aggregates", "max_excess_accuracy_gap")
            if _finite(value) and value > best[0]:
                best = (value, attribute)
        return best

    failing = [r for r in shape.runs if _get(r, "verdict", "passed") is False]
    if failing:
        candidates = failing
    else:
        top = max((r.get("ratio", 0) for r in shape.runs), default=None)
        candidates = [r for r in shape.runs if r.get("ratio") == top]
    ranked = [(max_gap(r), r) for r in candidates]
    ranked = [item for item in ranked if item[0][1] is not None]
    if not ranked:
        return None
    (_, attribute), run = max(ranked, key=lambda item: item[0][0])
    return run, attribute


def explanation(shape: _Shape) -> list[str]:
    """The plain-language summary as paragraphs (what happens, then the mechanism), every number formatted
    from the JSON."""
    found = focus_run(shape)
    if found is None:
        return ["No run has an excess accuracy gap to explain (no pruned run, or the gaps are undefined)."]
    run, attribute = found
    rows = [g for g in attribute.get("groups") or [] if _finite(g.get("excess_accuracy_gap"))]
    worst = max(rows, key=lambda g: g["excess_accuracy_gap"])
    name = attribute.get("attribute")
    drop = worst.get("accuracy_drop")
    verb = "loses" if not _finite(drop) or drop >= 0 else "gains"
    sentences = [(
        f"At {ratio(run.get('ratio'))} sparsity ({run.get('label')}) the {name} group '{worst['group']}' {verb} "
        f"{points(abs(drop) if _finite(drop) else None)} points of accuracy ({fraction(worst.get('dense_accuracy'))} → "
        f"{fraction(worst.get('accuracy'))}) against {points(_get(run, 'overall', 'accuracy_drop'))} overall: its "
        f"excess accuracy gap ψ = {points(worst['excess_accuracy_gap'])} points is the largest of the "
        f"{len(rows)} groups."
    )]
    if worst.get("small_group"):
        sentences.append(f"It has only {count(worst.get('n'))} examples, below the minimum group size, so treat its "
                         "numbers with caution.")
    groups = [g.get("group") for g in attribute.get("groups") or []]
    gradient = {g: shape.dense_figure(name, g, "diagnostics", "dense_gradient_norm") for g in groups}
    curvature = {g: shape.dense_figure(name, g, "diagnostics", "dense_hessian_trace") for g in groups}
    g = worst["group"]
    first = _rank_words("dense gradient norm", gradient.get(g), _rank(gradient, g), number)
    second = _rank_words("dense Hessian trace", curvature.get(g), _rank(curvature, g), number)
    sentences.append(f"{first[0].upper()}{first[1:]}; {second}.")
    verdict = run.get("verdict")
    if verdict is not None:
        if verdict.get("passed"):
            sentences.append("This run passes the policy.")
        else:
            reasons = "; ".join(verdict.get("reasons") or []) or "see the checks below"
            sentences.append(f"This run fails the policy: {reasons}.")
    return [" ".join(sentences), " ".join(spearman_sentences(attribute.get("diagnostics"), len(groups)))]


# ------------------------------------------------------------------------------------------------ tables


def group_table(shape: _Shape, name: str) -> list[dict]:
    """Per-group rows of every pruned run for one attribute, cells keyed by their JSON field."""
    blocks = []
    for method in shape.methods:
        for run in shape.by_method[method]:
            attribute = shape.attribute(run, name)
            if attribute is None:
                continue
            rows = []
            for g in attribute.get("groups") or []:
                ci = g.get("confidence_intervals") or {}
                flips = g.get("flips") or {}
                rows.append({"group": g.get("group"), "small": bool(g.get("small_group")), "cells": [
                    ("n", count(g.get("n"))),
                    ("share", fraction(g.get("share"))),
                    ("dense_accuracy", fraction(g.get("dense_accuracy"))),
                    ("accuracy", fraction(g.get("accuracy"))),
                    ("accuracy_ci", interval(ci.get("accuracy_ci"), fraction)),
                    ("accuracy_drop", points(g.get("accuracy_drop"))),
                    ("excess_accuracy_gap", points(g.get("excess_accuracy_gap"))),
                    ("excess_accuracy_gap_ci", interval(ci.get("excess_accuracy_gap_ci"), points)),
                    ("excessive_loss", number(g.get("excessive_loss"))),
                    ("predicted_excessive_loss", number(_get(g, "diagnostics", "predicted_excessive_loss"))),
                    ("flips_correct_to_wrong", count(flips.get("flips_correct_to_wrong"))),
                    ("flips_wrong_to_correct", count(flips.get("flips_wrong_to_correct"))),
                ]})
            blocks.append({"run": run, "ratio": ratio(run.get("ratio")), "rows": rows,
                           "passed": _get(run, "verdict", "passed")})
    return blocks


def diagnostics_table(shape: _Shape, name: str) -> list[dict]:
    rows = []
    for group in shape.groups(name):
        row = shape.dense_row(name, group)
        rows.append({"group": group, "small": bool(row.get("small_group")), "cells": [
            ("n", count(row.get("n"))),
            ("share", fraction(row.get("share"))),
            ("dense_accuracy", fraction(row.get("dense_accuracy"))),
            ("dense_gradient_norm", number(shape.dense_figure(name, group, "diagnostics", "dense_gradient_norm"))),
            ("dense_hessian_trace", number(shape.dense_figure(name, group, "diagnostics", "dense_hessian_trace"))),
            ("dense_hessian_top_eigenvalue",
             number(shape.dense_figure(name, group, "diagnostics", "dense_hessian_top_eigenvalue"))),
            ("dense_boundary_proximity",
             number(shape.dense_figure(name, group, "boundary", "dense_boundary_proximity"))),
            ("dense_logit_margin", number(shape.dense_figure(name, group, "boundary", "dense_logit_margin"))),
        ]})
    return rows


def aggregates_table(shape: _Shape, name: str) -> list[dict]:
    rows = []
    for run in [shape.dense, *[r for m in shape.methods for r in shape.by_method[m]]]:
        aggregates = _get(shape.attribute(run, name), "aggregates") or {}
        rows.append({"run": run, "passed": _get(run, "verdict", "passed"), "cells": [
            ("ratio", ratio(run.get("ratio"))),
            ("achieved_sparsity", fraction(run.get("achieved_sparsity"))),
            ("overall_accuracy", fraction(_get(run, "overall", "accuracy"))),
            ("overall_accuracy_drop", points(_get(run, "overall", "accuracy_drop"))),
            ("max_excess_accuracy_gap", points(aggregates.get("max_excess_accuracy_gap"))),
            ("pairwise_disparity", points(aggregates.get("pairwise_disparity"))),
            ("max_accuracy_drop", points(aggregates.get("max_accuracy_drop"))),
            ("accuracy_fairness_violation", points(aggregates.get("accuracy_fairness_violation"))),
            ("loss_fairness_violation", number(aggregates.get("loss_fairness_violation"))),
            ("worst_group", MISSING if aggregates.get("worst_group") is None else str(aggregates["worst_group"])),
            ("worst_group_accuracy", fraction(aggregates.get("worst_group_accuracy"))),
        ]})
    return rows


COMPRESSION_FIELDS = [("parameters", count), ("nonzero_parameters", count), ("macs", count), ("file_bytes", count),
                      ("latency_s_batch_1", ms), ("latency_s_batch_64", ms)]


def compression_table(shape: _Shape) -> tuple[list[tuple[str, str]], list[dict]]:
    present = [(key, fmt) for key, fmt in COMPRESSION_FIELDS
               if any(_get(r, "compression", side, key) is not None for r in [shape.dense, *shape.runs]
                      for side in ("dense", "pruned"))]
    rows = []
    dense_cost = _get(shape.dense, "compression", "dense") or {}
    if dense_cost:
        rows.append({"run": shape.dense, "cells": [(key, fmt(dense_cost.get(key)), MISSING) for key, fmt in present]})
    for method in shape.methods:
        for run in shape.by_method[method]:
            pruned = _get(run, "compression", "pruned") or {}
            ratios = _get(run, "compression", "ratios") or {}
            rows.append({"run": run, "cells": [(key, fmt(pruned.get(key)), times(ratios.get(key)))
                                               for key, fmt in present]})
    return [(key, key.replace("_", " ").replace("latency s", "latency")) for key, _ in present], rows


def verdict_context(shape: _Shape) -> dict:
    verdict = shape.report.get("verdict") or {}
    highest = verdict.get("highest_passing_ratio") or {}
    methods = []
    for method in shape.methods or list(highest):
        runs = shape.by_method.get(method, [])
        first_failing = next((r for r in runs if _get(r, "verdict", "passed") is False), None)
        methods.append({
            "label": method,
            "highest": ratio(highest.get(method)),
            "none_passes": method in highest and highest.get(method) is None,
            "first_failing": ratio(first_failing.get("ratio")) if first_failing else MISSING,
            "reasons": _get(first_failing, "verdict", "reasons") or [],
        })
    policy = shape.policy
    thresholds = [
        ("max_excess_accuracy_gap", "max excess accuracy gap ψ (ε)", points(policy.get("max_excess_accuracy_gap")),
         " points"),
        ("max_worst_group_drop", "max accuracy drop of any group", points(policy.get("max_worst_group_drop")),
         " points"),
        ("max_accuracy_fairness_violation", "max accuracy fairness violation",
         points(policy.get("max_accuracy_fairness_violation")), " points"),
        ("min_group_size", "minimum group size for a verdict", count(policy.get("min_group_size")), " examples"),
    ]
    thresholds = [(key, words, value, unit if value != MISSING else " (not checked)")
                  for key, words, value, unit in thresholds]
    return {"present": bool(verdict), "passed": verdict.get("passed"), "summary": verdict.get("summary"),
            "methods": methods, "thresholds": thresholds}


def run_checks(shape: _Shape) -> list[dict]:
    rows = []
    for method in shape.methods:
        for run in shape.by_method[method]:
            verdict = run.get("verdict") or {}
            rows.append({"run": run, "ratio": ratio(run.get("ratio")), "passed": verdict.get("passed"),
                         "reasons": verdict.get("reasons") or [],
                         "checks": [{"name": c.get("name"), "attribute": c.get("attribute"),
                                     "value": points(c.get("value")), "threshold": points(c.get("threshold")),
                                     "passed": c.get("passed")} for c in verdict.get("checks") or []]})
    return rows


def notes(shape: _Shape) -> list[str]:
    """Run notes, and why figures are undefined or rest on part of the data; each said once."""
    seen: dict[str, None] = {}
    for run in [shape.dense, *shape.runs]:
        for key, text in (run.get("notes") or {}).items():
            seen.setdefault(f"{key}: {text}")
        for attribute in run.get("attributes") or []:
            name = attribute.get("attribute")
            for kind in ("undefined", "caveats"):
                for key, text in (attribute.get(kind) or {}).items():
                    seen.setdefault(f"{name}: {key}: {text}")
            for group in attribute.get("groups") or []:
                for key, text in (group.get("undefined") or {}).items():
                    seen.setdefault(f"{name} group '{group.get('group')}': {key}: {text}")
    return list(seen)


def mitigation_context(shape: _Shape, plots: _Plots) -> dict | None:
    """The 'mitigation before/after' section: per method and ratio, each mitigation next to 'none', on the
    evaluation and the train split, with the multipliers and the wall time; None when the audit has none."""
    bases = shape.base_methods()
    if not bases:
        return None
    attribute = next(_get(r, "mitigation_details", "attribute") for r in shape.runs if r.get("mitigation_details"))
    order = shape.mitigations()
    rows = []
    for base in bases:
        runs = [r for r in shape.runs if shape.base_method(r) == base]
        for run in sorted(runs, key=lambda r: (r.get("ratio", 0), order.index(shape.mitigation(r)))):
            details = run.get("mitigation_details") or {}
            multipliers = details.get("multipliers") or {}
            largest = max(multipliers, key=multipliers.get) if multipliers else None
            eval_aggregates = _get(shape.split_attribute(run, attribute, "eval"), "aggregates") or {}
            train_aggregates = _get(shape.split_attribute(run, attribute, "train"), "aggregates") or {}
            rows.append({
                "run": run, "base": base, "mitigation": shape.mitigation(run), "ratio": ratio(run.get("ratio")),
                "cells": [
                    ("accuracy", fraction(_get(run, "overall", "accuracy"))),
                    ("train_accuracy", fraction(_get(run, "train", "overall", "accuracy"))),
                    ("max_excess_accuracy_gap", points(eval_aggregates.get("max_excess_accuracy_gap"))),
                    ("train_max_excess_accuracy_gap", points(train_aggregates.get("max_excess_accuracy_gap"))),
                    ("max_accuracy_drop", points(eval_aggregates.get("max_accuracy_drop"))),
                    ("loss_fairness_violation", number(eval_aggregates.get("loss_fairness_violation"))),
                ],
                "largest_multiplier": f"{_label(largest)}: {number(multipliers[largest])}" if largest else MISSING,
                "seconds": number(details.get("seconds")),
                "passed": _get(run, "verdict", "passed"),
            })
    return {"attribute": attribute, "rows": rows, "sentences": mitigation_sentences(shape, attribute),
            "svg": plots.render(plots.mitigation_curves, attribute)}


def mitigation_sentences(shape: _Shape, attribute: str) -> list[str]:
    """Each constrained mitigation against plain fine-tuning at the highest ratio, on both splits, in words."""
    sentences = []
    for base in shape.base_methods():
        runs = [r for r in shape.runs if shape.base_method(r) == base]
        top = max(r["ratio"] for r in runs)
        at_top = {shape.mitigation(r): r for r in runs if r["ratio"] == top}
        reference = "finetune" if "finetune" in at_top else "none"
        for name, run in at_top.items():
            if name in ("none", reference):
                continue
            figures = [(split, shape.max_gap(at_top[reference], attribute, split), shape.max_gap(run, attribute, split))
                       for split in ("train", "eval")]
            if not all(_finite(before) and _finite(after) for _, before, after in figures):
                continue
            words = [f"on the {'train' if split == 'train' else 'evaluation'} split from {points(before)} to "
                     f"{points(after)} points" for split, before, after in figures]
            sentences.append(f"At {ratio(top)} sparsity ({base}), {name} moves the largest excess accuracy gap "
                             f"against {'plain fine-tuning' if reference == 'finetune' else 'no mitigation'} "
                             f"{words[0]} and {words[1]}.")
    sentences.append("The evaluation split is what a deployed model meets: Balancing Act reports that every method "
                     "it tried, its own included, often fails to carry gains on the train split over to unseen data.")
    return sentences


# ------------------------------------------------------------------------------------------------- page


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(fraction=fraction, points=points, ratio=ratio, number=number, count=count)
    return env


def _slug(text: Any) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "attribute"


def _attribute_sections(shape: _Shape, plots: _Plots) -> list[dict]:
    sections = []
    for index, name in enumerate(shape.attributes):
        dense_aggregates = _get(shape.attribute(shape.dense, name), "aggregates") or {}
        small = dense_aggregates.get("small_groups") or []
        figures = [
            ("accuracy", "Accuracy of each group as sparsity grows",
             "One line per group; the dense model at ratio 0; dashed: overall accuracy.", plots.accuracy_curves),
            ("excess-gap", "Excess accuracy gap ψ per group and ratio",
             "ψa = group's accuracy drop − overall drop, in points; above the dashed ε line the policy fails.",
             plots.gap_bars),
            ("excessive-loss", "Excessive loss R(a) per group and ratio",
             "R(a) = pruned loss − dense loss of the group; red diamonds: the second-order prediction R̂(a).",
             plots.loss_bars),
            ("gradient-vs-size", "Dense gradient norm vs group size",
             "Tran et al.: smaller groups tend to have larger gradient norms, and larger norms more harm.",
             plots.gradient_vs_size),
            ("curvature-vs-boundary", "Curvature vs distance to the decision boundary",
             "Groups near the boundary (high p(1 − p)) tend to have a larger Hessian trace, and more harm.",
             plots.curvature_vs_boundary),
            ("flips", "Prediction flips per group",
             ("Share of the group's examples the pruned model gets wrong that the dense one got right (up), "
              "and the reverse (down, hatched)."), plots.flip_bars),
            ("group-sizes", "Group sizes", "Orange: below the minimum group size (the policy ignores them).",
             plots.group_sizes),
        ]
        rendered = []
        for key, title, caption, build in figures:
            svg = plots.render(build, name)
            rendered.append({"testid": f"plot-{key}", "title": title, "caption": caption, "svg": svg,
                             "id": f"{_slug(name)}-{key}"})
        sections.append({
            "name": name, "slug": _slug(name), "first": index == 0, "figures": rendered,
            "small_groups": small,
            "min_group_size": count(shape.policy.get("min_group_size", dense_aggregates.get("min_group_size"))),
            "n_missing": count(_get(shape.attribute(shape.dense, name), "n_missing")),
            "groups": group_table(shape, name), "diagnostics": diagnostics_table(shape, name),
            "aggregates": aggregates_table(shape, name),
        })
    return sections


def render_report_html(report: dict) -> str:
    """The report page, from the report JSON (`AuditReport.model_dump(mode="json")` with policy and verdicts)."""
    shape = _Shape(report)
    plots = _Plots(shape)
    compression_columns, compression_rows = compression_table(shape)
    model = report.get("model") or {}
    dataset = report.get("dataset") or {}
    environment = report.get("environment") or {}
    context = {
        "report": report,
        "audit_id": str(report.get("audit_id", "")),
        "model": model,
        "architecture": _get(model, "architecture", "name") or MISSING,
        "parameter_count": count(model.get("parameter_count")),
        "dataset": dataset,
        "rows": count(dataset.get("rows")),
        "environment": [(str(k), str(v)) for k, v in environment.items()
                        if not isinstance(v, (dict, list)) and v is not None],
        "verdict": verdict_context(shape),
        "explanation": explanation(shape),
        "attributes": _attribute_sections(shape, plots),
        "run_checks": run_checks(shape),
        "compression_columns": compression_columns,
        "compression_rows": compression_rows,
        "mitigation": mitigation_context(shape, plots),
        "notes": notes(shape),
        "missing": MISSING,
        "json_url": f"/v1/audits/{report.get('audit_id', '')}/report",
        "csv_url": f"/v1/audits/{report.get('audit_id', '')}/report.csv",
    }
    return _environment().get_template("report.html").render(**context)

