"""Histograms and bar charts as inline SVG, written directly as SVG elements.

Why by hand and not a plotting library: the charts are bars, two axes, tick labels and dashed
threshold lines, nothing a library adds to. matplotlib (which drew them before) cost 1.2 s to
import and 1.0 s to lay out ten charts per `stiv report`, the largest part of the report's
time over its floor (`bench/report.py`). These functions take milliseconds and import
nothing but numpy.

Each bar is a `<rect>` whose id ends in `-bar-<index>`, so the browser test counts the bars of
every chart in the DOM. Ids are prefixed per chart because several SVG documents share one
HTML page. The same data always gives the same file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from html import escape

import numpy as np

from data_engine.report.scan import Threshold

_BAR_COLOUR = "#4c72b0"
_AXIS_COLOUR = "#333"
_MARK_COLOURS = ("#c44e52", "#dd8452", "#55a868", "#8172b3", "#937860", "#da8bc3")
_WIDTH, _HEIGHT = 640, 240  # CSS pixels
_FONT = "font-family='sans-serif' font-size='9'"
_CHAR_PX = 5.5  # mean width of one 9 px sans-serif character, for the label margin


def nice_ticks(low: float, high: float, target: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [low, high]."""
    if not high > low:
        high = low + 1.0
    raw = (high - low) / target
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9)
    last = math.floor(high / step + 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def covering_ticks(high: float) -> list[float]:
    """Nice ticks from 0 up to the first tick at or above `high` (the axis ends on a tick)."""
    ticks = nice_ticks(0.0, max(high, 1e-12))
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    while ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _label(value: float) -> str:
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.4g}"


def _svg(width: float, height: float, body: list[str]) -> str:
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{height:.0f}' "
        f"viewBox='0 0 {width:.0f} {height:.0f}' {_FONT}>" + "".join(body) + "</svg>"
    )


def _text(x: float, y: float, text: str, anchor: str = "middle", extra: str = "") -> str:
    return f"<text x='{x:.1f}' y='{y:.1f}' text-anchor='{anchor}' {extra}>{escape(text)}</text>"


def histogram_svg(
    key: str,
    edges: np.ndarray,
    counts: np.ndarray,
    unit: str,
    marks: list[tuple[str, Threshold]],
) -> tuple[str, int]:
    """(SVG, number of bars drawn) for counts (B,) over edges (B + 1,), with threshold lines.

    marks: (label, threshold) pairs; each becomes a dashed vertical line with its label. The
    x range covers the bins and every threshold. Only non-empty bins are drawn as bars.
    """
    left, right, top, bottom = 64.0, _WIDTH - 13.0, 10.0, _HEIGHT - 48.0
    values = [float(edges[0]), float(edges[-1]), *(t.value for _, t in marks)]
    x_low, x_high = min(values), max(values)
    pad = 0.02 * ((x_high - x_low) or 1.0)
    x_low, x_high = x_low - pad, x_high + pad
    y_ticks = covering_ticks(max(float(counts.max(initial=0)), 1.0))
    y_high = y_ticks[-1]

    def sx(v: float) -> float:
        return left + (v - x_low) / (x_high - x_low) * (right - left)

    def sy(v: float) -> float:
        return bottom - v / y_high * (bottom - top)

    prefix = f"chart-{key}"
    body = []
    nonzero = np.flatnonzero(counts)
    for index, b in enumerate(nonzero):
        x0, x1 = sx(float(edges[b])), sx(float(edges[b + 1]))
        y = sy(float(counts[b]))
        body.append(
            f"<rect id='{prefix}-bar-{index}' x='{x0:.2f}' y='{y:.2f}' "
            f"width='{max(x1 - x0, 0.5):.2f}' height='{bottom - y:.2f}' fill='{_BAR_COLOUR}'/>"
        )
    body += _axes(left, right, top, bottom)
    body += _x_ticks(nice_ticks(x_low, x_high), sx, bottom)
    for v in y_ticks:
        y = sy(v)
        body.append(
            f"<line x1='{left - 4}' y1='{y:.1f}' x2='{left}' y2='{y:.1f}' stroke='{_AXIS_COLOUR}'/>"
        )
        body.append(_text(left - 6, y + 3, _label(v), "end"))
    body.append(_text((left + right) / 2, _HEIGHT - 12, unit))
    body.append(
        _text(
            14,
            (top + bottom) / 2,
            "clips",
            extra=f"transform='rotate(-90 14 {(top + bottom) / 2:.1f})'",
        )
    )
    body += _marks(marks, sx, top, bottom, prefix)
    return _svg(_WIDTH, _HEIGHT, body), len(nonzero)


def _axes(left: float, right: float, top: float, bottom: float) -> list[str]:
    return [
        f"<line x1='{left}' y1='{bottom}' x2='{right}' y2='{bottom}' stroke='{_AXIS_COLOUR}'/>",
        f"<line x1='{left}' y1='{top}' x2='{left}' y2='{bottom}' stroke='{_AXIS_COLOUR}'/>",
    ]


def _x_ticks(ticks: list[float], sx: Callable[[float], float], bottom: float) -> list[str]:
    """Tick marks and labels under the x axis at `bottom`."""
    body = []
    for v in ticks:
        x = sx(v)
        body.append(
            f"<line x1='{x:.1f}' y1='{bottom}' x2='{x:.1f}' y2='{bottom + 4}' stroke='{_AXIS_COLOUR}'/>"
        )
        body.append(_text(x, bottom + 15, _label(v)))
    return body


def _marks(
    marks: list[tuple[str, Threshold]],
    sx: Callable[[float], float],
    top: float,
    bottom: float,
    prefix: str,
) -> list[str]:
    """A dashed line per threshold, labelled; one colour per label, labels stacked in 4 rows."""
    colours: dict[str, str] = {}
    body = []
    for index, (label, threshold) in enumerate(marks):
        colours.setdefault(label, _MARK_COLOURS[len(colours) % len(_MARK_COLOURS)])
        colour = colours[label]
        x = sx(threshold.value)
        row = list(colours).index(label) % 4
        body.append(
            f"<line id='{prefix}-mark-{index}' x1='{x:.1f}' y1='{top}' x2='{x:.1f}' "
            f"y2='{bottom}' stroke='{colour}' stroke-width='1.2' stroke-dasharray='5 3'/>"
        )
        text = f"{label}: {threshold.op} {threshold.value:g}"
        # Labels go right of their line, or left of it where they would leave the canvas.
        fits = x + 4 + 0.85 * _CHAR_PX * len(text) <= _WIDTH
        anchor, tx = ("start", x + 4) if fits else ("end", x - 4)
        body.append(_text(tx, top + 10 + 14 * row, text, anchor, f"fill='{colour}' font-size='8'"))
    return body


def category_svg(counts: dict[str, int]) -> tuple[str, int]:
    """(SVG, number of bars) of clips per category, largest first (horizontal bars)."""
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    longest = max((len(name) for name, _ in ordered), default=1)
    left = min(0.5 * _WIDTH, 16 + _CHAR_PX * longest)
    right, top, row_px = _WIDTH - 20.0, 8.0, 20.0
    bottom = top + row_px * max(len(ordered), 1)
    height = bottom + 40
    x_ticks = covering_ticks(max((v for _, v in ordered), default=1))
    x_high = x_ticks[-1]

    def sx(v: float) -> float:
        return left + v / x_high * (right - left)

    body = []
    for index, (name, value) in enumerate(ordered):
        y = top + row_px * index
        body.append(
            f"<rect id='chart-category-bar-{index}' x='{left:.1f}' y='{y + 3:.1f}' "
            f"width='{sx(value) - left:.2f}' height='{row_px - 6:.1f}' fill='{_BAR_COLOUR}'/>"
        )
        body.append(_text(left - 6, y + row_px / 2 + 3, name, "end"))
    body += _axes(left, right, top, bottom)
    body += _x_ticks(x_ticks, sx, bottom)
    body.append(_text((left + right) / 2, height - 8, "clips"))
    return _svg(_WIDTH, height, body), len(ordered)
