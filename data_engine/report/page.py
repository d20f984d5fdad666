"""The report's one HTML page: inline CSS, inline SVG charts, thumbnails as local JPEG files.

No script and no remote URL: a Content-Security-Policy meta tag lets the page load only its own
files (`file:` images) and inline styles, so even a stray URL in a caption cannot fetch.
Every text from the database is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from data_engine.report.sections import (
    DsgSection,
    DuplicateSection,
    Overview,
    QuarantineSection,
    SnapshotSummary,
)
from data_engine.report.thumbs import ThumbRequest

CSP = "default-src 'none'; img-src file: 'self'; style-src 'unsafe-inline'"
SECTIONS = (  # (anchor, heading) in page order
    ("overview", "Overview"),
    ("histograms", "Score histograms"),
    ("filters", "Filters"),
    ("dsg", "Captions and DSG-Video"),
    ("quarantine", "Quarantine"),
    ("duplicates", "Duplicates"),
)
_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
nav{padding:8px 24px;background:#e7eaf0}nav a{margin-right:16px}
main{padding:0 24px 40px;max-width:1400px}section{margin-top:24px}
h2 a,h3 a{color:inherit;text-decoration:none}h2 a:hover::after,h3 a:hover::after{content:" #"}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #d5d9e0;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#eef0f4}td.n{text-align:right}
.chart{background:#fff;border:1px solid #d5d9e0;padding:8px;margin:10px 0}
.chart svg{width:100%;max-width:900px;height:auto}
.strip{display:flex;flex-wrap:wrap;gap:8px}.thumb{margin:0;font-size:12px;max-width:420px}
.thumb img{display:block;max-height:96px;border:1px solid #bbb}.missing{color:#8a6d3b}
.note{color:#5a6270}.absent{color:#8a6d3b;font-style:italic}
.group{display:flex;gap:8px;align-items:flex-start;background:#fff;border:1px solid #d5d9e0;
padding:6px;margin:6px 0;overflow-x:auto}.kept img{border:2px solid #55a868}
.frames{display:flex;gap:6px}.no{color:#c44e52;font-weight:600}.yes{color:#55a868}
details pre{white-space:pre-wrap;font-size:11px;max-width:1000px}
"""


@dataclass
class Strip:
    """Thumbnails under one histogram: (band label, value, thumbnail) per clip."""

    picks: list[tuple[str, float, dict[str, Any], ThumbRequest | None]]


@dataclass
class Chart:
    key: str
    title: str
    svg: str
    bars: int
    note: str  # rows counted, missing values, range
    strip: Strip | None


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table; cells are already HTML (escape before). No header row when all empty."""
    head = "".join(f"<th>{h}</th>" for h in header) if any(header) else ""
    body = "".join("<tr>" + "".join(rows_cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{body}</table>"


def rows_cell(cell: str) -> str:
    numeric = cell.replace(",", "").replace(".", "").replace("%", "").strip().lstrip("-")
    return f'<td class="n">{cell}</td>' if numeric.isdigit() else f"<td>{cell}</td>"


def _clip_label(clip: dict[str, Any]) -> str:
    name = os.path.basename(str(clip.get("uri") or ""))
    return f"{name} {clip.get('start_s', 0):.1f}-{clip.get('end_s', 0):.1f} s"


def thumb_html(request: ThumbRequest | None, caption: str, css: str = "thumb") -> str:
    """A figure with the clip's image(s), or the reason there is none."""
    if request is None:
        body = '<div class="missing">not decoded: --max-thumbnails reached</div>'
    elif request.error:
        body = f'<div class="missing">no thumbnail: {_e(request.error)}</div>'
    else:
        body = "".join(
            f'<img src="thumbs/{_e(name)}" alt="{_e(caption)}">' for name in request.images
        )
    return f'<figure class="{css}">{body}<figcaption>{caption}</figcaption></figure>'


def _heading(anchor: str, title: str, level: int = 2) -> str:
    return f'<h{level} id="{anchor}"><a href="#{anchor}">{_e(title)}</a></h{level}>'


# ------------------------------------------------------------------------------------------
# Sections


def overview_html(view: Overview) -> str:
    videos = ", ".join(f"{count:,} {status}" for status, count in sorted(view.videos.items()))
    quarantine = (
        "no quarantine table"
        if view.quarantined_videos is None
        else f"{view.quarantined_videos:,} videos, {view.quarantined_clips:,} clips"
    )
    rows = [
        ["Selection", _e(view.selection)],
        ["Clips", f"{view.clips:,} selected of {view.clips_in_table:,}"],
        ["Clip duration", f"{view.hours:,.2f} h ({60.0 * view.hours:,.1f} min)"],
        ["Videos (database)", _e(videos or "no videos table")],
        ["Hours of video (done)", _number(view.video_hours)],
        ["Quarantined", _e(quarantine)],
        ["Curated", _e(view.curated)],
    ]
    coverage = [
        [f"<code>{_e(col)}</code>", f"{n:,}", f"{100.0 * n / max(view.clips, 1):.1f}%"]
        for col, n in view.coverage
    ]
    parts = [_table(["", ""], rows), _heading("stages", "Stages and models", 3)]
    parts.append(_table(["score column", "clips with it", "share"], coverage))
    parts.append(_provenance_html(view))
    return "".join(parts)


def _provenance_html(view: Overview) -> str:
    if not view.provenance:
        return '<p class="absent">No provenance columns in the clips table.</p>'
    rows = []
    for stage in view.provenance:
        for summary, count, full in stage.variants or [("(no provenance)", 0, "")]:
            detail = f"<details><summary>{_e(summary)}</summary><pre>{_e(full)}</pre></details>"
            rows.append(
                [f"<code>{_e(stage.stage)}</code>", detail, f"{count:,} / {stage.sampled:,}"]
            )
    note = '<p class="note">Read from a uniform sample of the selected clips.</p>'
    return _table(["stage", "model and parameters", "sampled clips"], rows) + note


def charts_html(charts: list[Chart], absent: list[str], category: Chart | None) -> str:
    parts = []
    for chart in charts:
        parts.append(_heading(f"h-{chart.key}", chart.title, 3))
        parts.append(
            f'<div class="chart" data-chart="{_e(chart.key)}" data-bars="{chart.bars}">'
            f"{chart.svg}</div><p class='note'>{_e(chart.note)}</p>"
        )
        if chart.strip is not None:
            parts.append(_strip_html(chart.strip))
    parts.append(_heading("h-category", "Categories", 3))
    if category is None:
        parts.append('<p class="absent">No category column: the category stage has not run.</p>')
    else:
        parts.append(
            f'<div class="chart" data-chart="category" data-bars="{category.bars}">'
            f"{category.svg}</div>"
        )
    for title in absent:
        parts.append(f'<p class="absent">{_e(title)}</p>')
    return "".join(parts)


def _strip_html(strip: Strip) -> str:
    if not strip.picks:
        return '<p class="absent">No clips with this value to show.</p>'
    figures = [
        thumb_html(request, f"{_e(band)} · {_number(value)} · {_e(_clip_label(clip))}")
        for band, value, clip, request in strip.picks
    ]
    return f'<div class="strip">{"".join(figures)}</div>'


def filters_html(summaries: list[SnapshotSummary]) -> str:
    if not summaries:
        return '<p class="absent">No snapshots yet (`stiv snapshot create --db DB ...`).</p>'
    parts = []
    for item in summaries:
        snap = item.snapshot
        parts.append(_heading(f"snapshot-{snap.name}", f"Snapshot {snap.name}", 3))
        rows = [
            ["Filter", f"<code>{_e(snap.where or 'all rows')}</code>"],
            ["Table", _e(f"{snap.table} v{snap.version}")],
            ["Rows", f"{snap.num_rows:,}"],
            ["Hours", _number(item.hours)],
        ]
        parts.append(_table(["", ""], rows))
        if item.kept:
            kept = [
                [_e(name), f"{k:,}", f"{n:,}", f"{100.0 * k / n:.1f}%" if n else "n/a"]
                for name, (k, n) in sorted(item.kept.items(), key=lambda kv: -kv[1][1])
            ]
            parts.append(_table(["category", "kept", "of", "share kept"], kept))
        else:
            parts.append('<p class="absent">No category column at this version.</p>')
    return "".join(parts)


def dsg_html(section: DsgSection, thumb: Callable[[str], ThumbRequest | None]) -> str:
    parts = []
    if section.captioned is not None:
        parts.append(f"<p>{section.captioned:,} selected clips have a caption.</p>")
    else:
        parts.append('<p class="absent">No caption column: the caption stage has not run.</p>')
    if section.absent:
        return "".join([*parts, f'<p class="absent">{_e(section.absent)}</p>'])
    m = section.metrics
    rows = [
        ["DSG-Video_i (hallucinated objects / objects)", f"{_number(m.get('dsg_video_i'))} %"],
        ["DSG-Video_s (captions with one / captions)", f"{_number(m.get('dsg_video_s'))} %"],
        ["Captions checked", f"{m.get('captions', 0):,}"],
        ["Objects", f"{m.get('objects', 0):,}"],
        ["Hallucinated objects", f"{m.get('hallucinated_objects', 0):,}"],
        ["Checks failed", f"{m.get('failed', 0):,}"],
    ]
    parts.append(_table(["metric", "value"], rows))
    if section.claims_absent:
        return "".join([*parts, f'<p class="absent">{_e(section.claims_absent)}</p>'])
    parts.append(_heading("dsg-objects", "Most often hallucinated objects", 3))
    if section.top_objects:
        parts.append(
            _table(["object", "times"], [[_e(o), f"{n:,}"] for o, n in section.top_objects])
        )
    else:
        parts.append('<p class="absent">No hallucinated objects in the selection.</p>')
    parts.append(_heading("dsg-examples", "Examples", 3))
    for example in section.examples:
        parts.append(_dsg_example_html(example, thumb(example.clip["clip_id"])))
    return "".join(parts)


def _dsg_example_html(example: Any, request: ThumbRequest | None) -> str:
    clip = example.clip
    parts = [
        f"<div class='group'><div><p><b>{_e(_clip_label(clip))}</b>: "
        f"{clip.get('dsg_num_hallucinated', 0)} of {clip.get('dsg_num_objects', 0)} objects "
        f"hallucinated</p><p>{_e(clip.get('caption') or '(no caption)')}</p>"
    ]
    times = request.times_s if request is not None else []
    for claim in example.claims:
        frames = []
        for t, answer in zip(claim.frame_times_s, claim.frame_answers):
            css = "no" if answer == "no" else "yes" if answer == "yes" else ""
            caption = f"{t:.2f} s: <span class='{css}'>{_e(answer)}</span>"
            frames.append(_frame_html(request, times, t, caption))
        parts.append(
            f"<p><b>{_e(claim.verdict)}</b> ({_e(claim.kind)}) {_e(claim.question)}</p>"
            f"<div class='frames'>{''.join(frames) or '<span class=note>no frames</span>'}</div>"
        )
    return "".join(parts) + "</div></div>"


def _frame_html(request: ThumbRequest | None, times: list[float], t: float, caption: str) -> str:
    if request is None or request.error or t not in times:
        return thumb_html(request if request is None or request.error else None, caption)
    name = request.images[times.index(t)]
    return f'<figure class="thumb"><img src="thumbs/{_e(name)}" alt="frame at {t:.2f} s"><figcaption>{caption}</figcaption></figure>'


def quarantine_html(section: QuarantineSection) -> str:
    if section.absent:
        return f'<p class="absent">{_e(section.absent)}</p>'
    counts = [[_e(k.stage), _e(k.error_type), f"{k.count:,}"] for k in section.kinds]
    parts = [_table(["stage", "error type", "rows"], counts)]
    for kind in section.kinds:
        parts.append(
            _heading(f"q-{kind.stage}-{kind.error_type}", f"{kind.stage} / {kind.error_type}", 3)
        )
        rows = [
            [
                _e(row.get("uri") or ""),
                _e(row.get("clip_id") or "whole video"),
                f"<code>{_e(row.get('message') or '')}</code>",
                _e(row.get("attempts", "")),
            ]
            for row in kind.examples
        ]
        parts.append(_table(["uri", "clip", "message", "attempts"], rows))
    return "".join(parts)


def duplicates_html(section: DuplicateSection, thumb: Callable[[str], ThumbRequest | None]) -> str:
    if section.absent:
        return f'<p class="absent">{_e(section.absent)}</p>'
    parts = [
        f"<p>{section.total:,} selected clips are near-duplicates of an earlier clip; the "
        f"groups below come from the first {section.scanned:,} of them.</p>"
    ]
    for group in section.groups:
        kept = thumb_html(
            thumb(group.kept["clip_id"]), f"kept · {_e(_clip_label(group.kept))}", "thumb kept"
        )
        dups = [
            thumb_html(thumb(d["clip_id"]), f"duplicate · {_e(_clip_label(d))}")
            for d in group.duplicates
        ]
        more = group.size - len(group.duplicates)
        tail = f"<p class='note'>and {more:,} more</p>" if more > 0 else ""
        parts.append(f"<div class='group'>{kept}{''.join(dups)}{tail}</div>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------
# The page


def page_html(title: str, bodies: dict[str, str], generated: str) -> str:
    """The whole document; `bodies` maps each SECTIONS anchor to its inner HTML."""
    nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in SECTIONS)
    sections = "".join(
        f'<section data-section="{a}">{_heading(a, t)}{bodies[a]}</section>' for a, t in SECTIONS
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><div>{_e(generated)}</div></header>"
        f"<nav>{nav}</nav><main>{sections}</main></body></html>"
    )


def json_default(value: Any) -> Any:
    """JSON for numpy scalars in report.json."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, default=json_default, indent=1)
