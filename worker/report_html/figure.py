"""Figure style and layout for the page's plots, and the conversion of a matplotlib figure to an inline <svg>."""

from __future__ import annotations

import io
import math
import re
from typing import TYPE_CHECKING, Any

import matplotlib
from markupsafe import Markup
from matplotlib.figure import Figure

from worker.report_html.format import mathtext_escaped

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.typing import RcKeyType


# Matplotlib settings for every figure, applied in a context (the process's rcParams stay as they are).
# svg.fonttype "none": text stays text (small, selectable, printed sharp) in the browser's sans-serif font.
# svg.hashsalt: stable element ids, so the same report renders to the same bytes.
STYLE: dict[RcKeyType, Any] = {
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
MARKERS = "osD^v<>ph*"
RED = "#c0392b"


def palette(n: int) -> list:
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    if n <= 20:
        return [cmap(i) for i in range(n)]
    return [matplotlib.colormaps["turbo"](i / max(n - 1, 1)) for i in range(n)]


def svg_element(fig: Figure, prefix: str) -> Markup:
    """The figure as an inline <svg> element: no XML prolog, DOCTYPE (it names an outside DTD), namespace
    URIs or metadata, and every id prefixed so several SVGs on one page never share an id."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.DOTALL)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}-{m.group(1)}"', text)
    text = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}-{m.group(1)})", text)
    text = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}-{m.group(1)}"', text)
    text = re.sub(r"<svg\b", '<svg role="img" focusable="false"', text, count=1)
    return Markup(text.strip())


def panel_width_for(panels: int) -> float:
    return PANEL_WIDTH_IN if panels > 1 else 6.0


def panel_grid(
    n: int, height: float, extra_width: float = 1.6, panel_width: float = PANEL_WIDTH_IN
) -> tuple[Figure, list[Axes]]:
    cols = max(1, min(n, MAX_PANELS_PER_ROW))
    rows = math.ceil(max(n, 1) / cols)
    fig = Figure(figsize=(panel_width * cols + extra_width, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[: max(n, 1)]


def add_legend(fig: Figure, handles: list, labels: list, title: str) -> None:
    if handles:
        fig.legend(handles, labels, loc="outside right upper", title=title, ncols=1 if len(labels) <= 16 else 2)


def figure_legend(fig: Figure, axes: list[Axes], title: str) -> None:
    """One legend for all panels: each label once, with the handle of the first panel that has it."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(text, handle)
    add_legend(fig, list(handles.values()), list(handles), title)


def group_ticks(ax: Axes, groups: list[str]) -> None:
    long_names = max(len(str(g)) for g in groups) > 3
    ax.set_xticks(
        range(len(groups)),
        [mathtext_escaped(g) for g in groups],
        rotation=45 if long_names else 0,
        ha="right" if long_names else "center",
    )
