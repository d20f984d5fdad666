"""Histograms and bar charts as inline SVG, drawn by matplotlib's Agg backend.

Each bar carries an id ending in `-bar-<index>` (matplotlib writes an artist's gid as the SVG
group id), so the browser test counts the bars of every chart in the DOM. Ids are prefixed per
chart because several SVG documents share one HTML page.
"""

from __future__ import annotations

import io
import re

import matplotlib

matplotlib.use("Agg")  # never a GUI toolkit, whatever else imports pyplot in this process

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from data_engine.report.scan import Threshold

_STYLE = {
    "svg.fonttype": "none",  # text stays text (small SVG); the browser picks the font
    "svg.hashsalt": "stiv-report",  # stable ids: the same data gives the same file
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
_BAR_COLOUR = "#4c72b0"
_MARK_COLOURS = ("#c44e52", "#dd8452", "#55a868", "#8172b3", "#937860", "#da8bc3")
_SIZE_IN = (6.4, 2.4)  # figure size (inches) at 100 dpi: 640 x 240 CSS pixels


def _svg_text(fig: Figure, prefix: str) -> str:
    """The figure as an <svg> element (no XML prolog), every id prefixed with `prefix`."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")  # fixed margins: "tight" would draw twice
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r'id="([^"]+)"', rf'id="{prefix}-\1"', text)
    text = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}-\1)", text)
    return re.sub(r'xlink:href="#([^"]+)"', rf'xlink:href="#{prefix}-\1"', text)


def histogram_svg(
    key: str,
    edges: np.ndarray,
    counts: np.ndarray,
    unit: str,
    marks: list[tuple[str, Threshold]],
) -> tuple[str, int]:
    """(SVG, number of bars drawn) for counts (B,) over edges (B + 1,), with threshold lines.

    marks: (label, threshold) pairs; each becomes a dashed vertical line with its label.
    Only non-empty bins are drawn as bars.
    """
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=_SIZE_IN)
        ax = fig.subplots()
        nonzero = np.flatnonzero(counts)
        bars = ax.bar(
            edges[:-1][nonzero],
            counts[nonzero],
            width=np.diff(edges)[nonzero],
            align="edge",
            color=_BAR_COLOUR,
            linewidth=0,
        )
        for index, bar in enumerate(bars):
            bar.set_gid(f"bar-{index}")
        _draw_marks(ax, marks)
        ax.set_xlabel(unit)
        ax.set_ylabel("clips")
        ax.margins(x=0.02)
        fig.subplots_adjust(left=0.1, right=0.98, bottom=0.2, top=0.96)
        return _svg_text(fig, f"chart-{key}"), len(bars)


def _draw_marks(ax: Axes, marks: list[tuple[str, Threshold]]) -> None:
    labels: dict[str, str] = {}
    for label, threshold in marks:
        labels.setdefault(label, _MARK_COLOURS[len(labels) % len(_MARK_COLOURS)])
        colour = labels[label]
        ax.axvline(threshold.value, color=colour, linestyle="--", linewidth=1.2)
        ax.annotate(
            f"{label}: {threshold.op} {threshold.value:g}",
            xy=(threshold.value, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3 - 11 * (list(labels).index(label) % 4)),
            textcoords="offset points",
            va="top",
            color=colour,
            fontsize=8,
        )


def category_svg(counts: dict[str, int]) -> tuple[str, int]:
    """(SVG, number of bars) of clips per category, largest first (horizontal bars)."""
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    names = [name for name, _ in ordered][::-1]
    values = [value for _, value in ordered][::-1]
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(_SIZE_IN[0], max(1.2, 0.28 * len(names) + 0.6)))
        ax = fig.subplots()
        bars = ax.barh(names, values, color=_BAR_COLOUR)
        for index, bar in enumerate(bars):
            bar.set_gid(f"bar-{index}")
        ax.set_xlabel("clips")
        longest = max((len(n) for n in names), default=1)
        fig.subplots_adjust(left=min(0.5, 0.03 + 0.0125 * longest), right=0.97, bottom=0.25)
        return _svg_text(fig, "chart-category"), len(bars)
