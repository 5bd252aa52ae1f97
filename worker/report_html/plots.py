"""The page's plots: matplotlib figures drawn from the report and inlined as <svg> elements (style, layout and
the SVG conversion: worker.report_html.figure)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import matplotlib
from markupsafe import Markup
from matplotlib.figure import Figure

from worker.report_html.figure import (
    MARKERS,
    PANEL_WIDTH_IN,
    RED,
    STYLE,
    add_legend,
    figure_legend,
    group_ticks,
    palette,
    panel_grid,
    panel_width_for,
    svg_element,
)
from worker.report_html.format import count, finite, mathtext_escaped, points, ratio
from worker.report_html.index import ReadRow, ReportIndex, mitigation_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from service.schemas.reports import RunReport


class Plots:
    """Draws the figures of one page; numbers them so each SVG's ids get their own prefix."""

    def __init__(self, index: ReportIndex):
        self.index = index
        self.count = 0

    def render(self, build: Callable[[Plots, str], Figure | None], attribute: str) -> Markup | None:
        with matplotlib.rc_context(STYLE):
            fig = build(self, attribute)
            if fig is None:
                return None
            self.count += 1
            return svg_element(fig, f"fig{self.count}")

    def accuracy_curves(self, attribute: str) -> Figure | None:
        """Per-group accuracy as sparsity grows: the dense model at ratio 0, one line per group, one panel per
        method, and the overall accuracy dashed."""
        index, groups = self.index, self.index.groups(attribute)
        if not index.labels or not groups:
            return None
        fig, axes = panel_grid(len(index.labels), 3.4, panel_width=panel_width_for(len(index.labels)))
        colors = palette(len(groups))
        handles: list = []
        for ax, method in zip(axes, index.labels, strict=True):
            runs = index.runs_by_label[method]
            for i, group in enumerate(groups):
                xs, ys = [], []
                dense_accuracy = index.dense_row(attribute, group).dense_accuracy
                if finite(dense_accuracy):
                    xs.append(0.0)
                    ys.append(dense_accuracy * 100)
                for run in runs:
                    value = index.value(run, attribute, group, lambda row: row.accuracy)
                    if finite(value):
                        xs.append(run.ratio * 100)
                        ys.append(value * 100)
                (line,) = ax.plot(
                    xs,
                    ys,
                    marker=MARKERS[i % len(MARKERS)],
                    markersize=4,
                    color=colors[i],
                    linewidth=1.4,
                    label=mathtext_escaped(group),
                )
                if ax is axes[0]:
                    handles.append(line)
            xs = [0.0] + [r.ratio * 100 for r in runs]
            ys = [index.dense.overall.accuracy] + [r.overall.accuracy for r in runs]
            overall_points = [(x, y * 100) for x, y in zip(xs, ys, strict=True) if finite(y)]
            (overall,) = ax.plot(
                [p[0] for p in overall_points],
                [p[1] for p in overall_points],
                color="black",
                linestyle="--",
                linewidth=2,
                label="overall",
            )
            if ax is axes[0]:
                handles.append(overall)
            ax.set_title(mathtext_escaped(method))
            ax.set_xlabel("pruning ratio (%); 0 = dense model")
            ax.set_ylabel("accuracy (%)")
            ax.set_xticks(xs)
        add_legend(fig, handles, [h.get_label() for h in handles], mathtext_escaped(attribute))
        return fig

    def _grouped_bars(
        self,
        attribute: str,
        value: ReadRow,
        scale: float,
        ylabel: str,
        hline: tuple[float, str] | None = None,
        markers: ReadRow | None = None,
        negative: ReadRow | None = None,
    ) -> Figure | None:
        """One panel per method: for each group a bar per ratio (darker = higher ratio); `negative` is drawn
        downwards and hatched, `markers` as red diamonds."""
        index, groups = self.index, self.index.groups(attribute)
        if not index.labels or not groups:
            return None
        if not any(finite(index.value(run, attribute, g, value)) for run in index.runs for g in groups):
            return None
        fig, axes = panel_grid(
            len(index.labels),
            3.2,
            extra_width=1.4,
            panel_width=max(panel_width_for(len(index.labels)), 0.3 * len(groups) + 1.0),
        )
        for ax, method in zip(axes, index.labels, strict=True):
            ax.set_xlim(-0.6, len(groups) - 0.4)
            self._bars_per_ratio(ax, index.runs_by_label[method], attribute, groups, value, scale, markers, negative)
            ax.axhline(0, color="black", linewidth=0.8)
            if hline is not None:
                ax.axhline(hline[0], color=RED, linestyle="--", linewidth=1.2, label=hline[1])
            group_ticks(ax, groups)
            ax.grid(axis="x", visible=False)
            ax.set_title(mathtext_escaped(method))
            ax.set_ylabel(ylabel)
            ax.set_xlabel(mathtext_escaped(attribute))
        figure_legend(fig, axes, "pruning ratio")
        return fig

    def _bars_per_ratio(
        self,
        ax: Axes,
        runs: list[RunReport],
        attribute: str,
        groups: list[str],
        value: ReadRow,
        scale: float,
        markers: ReadRow | None,
        negative: ReadRow | None,
    ) -> None:
        cmap = matplotlib.colormaps["Blues"]
        bar_width = 0.8 / max(len(runs), 1)
        for j, run in enumerate(runs):
            shade = cmap(0.4 + 0.55 * (j + 1) / len(runs))
            offsets = [i - 0.4 + bar_width * (j + 0.5) for i in range(len(groups))]
            heights = [self.index.value(run, attribute, g, value) for g in groups]
            ax.bar(
                offsets,
                [h * scale if finite(h) else 0 for h in heights],
                bar_width,
                color=shade,
                label=ratio(run.ratio),
            )
            if negative:
                lows = [self.index.value(run, attribute, g, negative) for g in groups]
                ax.bar(
                    offsets,
                    [-v * scale if finite(v) else 0 for v in lows],
                    bar_width,
                    color=shade,
                    hatch="///",
                    edgecolor="white",
                    linewidth=0,
                )
            if markers:
                predicted = [self.index.value(run, attribute, g, markers) for g in groups]
                kept = [(o, p * scale) for o, p in zip(offsets, predicted, strict=True) if finite(p)]
                if kept:
                    ax.scatter(
                        [k[0] for k in kept],
                        [k[1] for k in kept],
                        marker="D",
                        s=14,
                        color=RED,
                        zorder=3,
                        label="R̂(a) predicted",
                    )

    def gap_bars(self, attribute: str) -> Figure | None:
        epsilon = self.index.policy.get("max_excess_accuracy_gap")
        hline = (epsilon * 100, f"ε = {points(epsilon)} points") if finite(epsilon) else None
        return self._grouped_bars(
            attribute, lambda row: row.excess_accuracy_gap, 100, "excess accuracy gap ψ (points)", hline=hline
        )

    def loss_bars(self, attribute: str) -> Figure | None:
        return self._grouped_bars(
            attribute,
            lambda row: row.excessive_loss,
            1,
            "excessive loss R(a)",
            markers=lambda row: row.diagnostics.predicted_excessive_loss,
        )

    def flip_bars(self, attribute: str) -> Figure | None:
        return self._grouped_bars(
            attribute,
            lambda row: row.flips.flips_correct_to_wrong_rate,
            100,
            "flips (% of group)\n↑ right→wrong   ↓ wrong→right (hatched)",
            negative=lambda row: row.flips.flips_wrong_to_correct_rate,
        )

    def group_sizes(self, attribute: str) -> Figure | None:
        index, groups = self.index, self.index.groups(attribute)
        sizes = [index.dense_row(attribute, g).n for g in groups]
        if not any(finite(n) for n in sizes):
            return None
        small = [index.dense_row(attribute, g).small_group for g in groups]
        fig = Figure(figsize=(8.5, max(1.8, 0.28 * len(groups) + 1.0)), layout="constrained")
        ax = fig.subplots()
        ax.barh(
            range(len(groups)),
            [n if finite(n) else 0 for n in sizes],
            color=["#e67e22" if s else "#4a78b5" for s in small],
        )
        ax.set_yticks(
            range(len(groups)),
            [mathtext_escaped(g) + ("  (small)" if s else "") for g, s in zip(groups, small, strict=True)],
        )
        ax.invert_yaxis()
        minimum = index.policy.get("min_group_size")
        dense_attribute = index.attribute(index.dense, attribute)
        if minimum is None and dense_attribute is not None:
            minimum = dense_attribute.aggregates.min_group_size
        if finite(minimum):
            ax.axvline(minimum, color=RED, linestyle="--", linewidth=1.2, label=f"minimum group size {count(minimum)}")
            fig.legend(loc="outside right upper")
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("examples (n)")
        ax.set_title(f"group sizes — {mathtext_escaped(attribute)}")
        return fig

    def _scatter(
        self,
        attribute: str,
        x_of: Callable[[str], Any],
        y_of: Callable[[str], Any],
        xlabel: str,
        ylabel: str,
        title: str,
    ) -> Figure | None:
        """One labelled point per group; a log x axis where x spans more than a factor 30."""
        groups = self.index.groups(attribute)
        found = [(g, x_of(g), y_of(g)) for g in groups]
        found = [p for p in found if finite(p[1]) and finite(p[2])]
        if not found:
            return None
        colors = palette(len(groups))
        fig = Figure(figsize=(6.2, 4.2), layout="constrained")
        ax = fig.subplots()
        for g, x, y in found:
            i = groups.index(g)
            ax.scatter([x], [y], color=colors[i], marker=MARKERS[i % len(MARKERS)], s=40, zorder=3)
            ax.annotate(mathtext_escaped(g), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8)
        xs = [p[1] for p in found]
        if min(xs) > 0 and max(xs) / min(xs) > 30:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        return fig

    def gradient_vs_size(self, attribute: str) -> Figure | None:
        index = self.index
        return self._scatter(
            attribute,
            lambda g: index.dense_row(attribute, g).n,
            lambda g: index.dense_figure(attribute, g, lambda row: row.diagnostics.dense_gradient_norm),
            "group size n",
            "dense gradient norm ‖∇J_a(θd)‖",
            "gradient norm vs group size",
        )

    def curvature_vs_boundary(self, attribute: str) -> Figure | None:
        index = self.index
        return self._scatter(
            attribute,
            lambda g: index.dense_figure(attribute, g, lambda row: row.boundary.dense_boundary_proximity),
            lambda g: index.dense_figure(attribute, g, lambda row: row.diagnostics.dense_hessian_trace),
            "dense boundary proximity, mean p_y(1 − p_y) (higher = nearer)",
            "dense Hessian trace Tr H_a",
            "curvature vs distance to the decision boundary",
        )

    def mitigation_curves(self, attribute: str) -> Figure | None:
        """Max ψ vs ratio, one line per mitigation ('none' included): per pruning method, the evaluation split
        and the train split side by side (Balancing Act: gains on the train split may not carry over)."""
        methods = self.index.mitigated_methods()
        if not methods:
            return None
        fig, axes = panel_grid(2 * len(methods), 3.2, panel_width=PANEL_WIDTH_IN)
        for k, method in enumerate(methods):
            for ax, split in zip(axes[2 * k : 2 * k + 2], ("eval", "train"), strict=True):
                self._mitigation_panel(ax, method, split, attribute)
        figure_legend(fig, axes, "mitigation")
        return fig

    def _mitigation_panel(self, ax: Axes, method: str, split: str, attribute: str) -> None:
        index = self.index
        mitigations = index.mitigation_labels()
        colors = palette(len(mitigations))
        for i, mitigation in enumerate(mitigations):
            runs = [r for r in index.runs if index.pruning_label(r) == method and mitigation_label(r) == mitigation]
            gaps = [
                (r.ratio * 100, value * 100)
                for r in sorted(runs, key=lambda r: r.ratio)
                for value in [index.max_gap(r, attribute, split)]
                if finite(value)
            ]
            if gaps:
                ax.plot(
                    [p[0] for p in gaps],
                    [p[1] for p in gaps],
                    marker=MARKERS[i % len(MARKERS)],
                    color=colors[i],
                    linewidth=1.6 if mitigation != "none" else 2.2,
                    linestyle="-" if mitigation != "none" else ":",
                    label=mathtext_escaped(mitigation),
                )
        epsilon = index.policy.get("max_excess_accuracy_gap")
        if finite(epsilon):
            ax.axhline(epsilon * 100, color=RED, linestyle="--", linewidth=1.2, label=f"ε = {points(epsilon)} points")
        ax.axhline(0, color="black", linewidth=0.8)
        # Unmitigated gaps are often tens of points and mitigated ones a few: a linear axis hides the latter.
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_title(mathtext_escaped(f"{method} — {'evaluation' if split == 'eval' else 'train'} split"))
        ax.set_xlabel("pruning ratio (%)")
        ax.set_ylabel("max excess accuracy gap ψ (points, symlog)")
