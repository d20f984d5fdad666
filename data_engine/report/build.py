"""`write_report`: gathers every section, plans and decodes thumbnails, writes the page."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from data_engine.report import charts, page, sections
from data_engine.report.scan import (
    Histogram,
    ScanResult,
    Selection,
    Threshold,
    fetch_rows,
    parse_thresholds,
    scan_scores,
    select_clips,
    sql_string,
)
from data_engine.report.thumbs import ThumbRequest, clip_times, write_thumbnails
from data_engine.store import VIDEOS, Database, StoreError
from stiv_core.uris import is_local, local_path

DEFAULT_MAX_THUMBNAILS = 80  # clips decoded at most, over every section
SAMPLE_ROWS = 20_000  # uniform sample of selected rows behind the strips and provenance
STRIP_FRAMES = 3  # frames per clip thumbnail
THUMB_HEIGHT_PX = 96  # display height of one thumbnail frame
PER_BAND = 2  # clips per decile band under each histogram
_BANDS = (("low decile", 0.0, 0.1), ("middle decile", 0.45, 0.55), ("high decile", 0.9, 1.0))


@dataclass(frozen=True)
class ReportSummary:
    """What `write_report` wrote."""

    index_html: Path
    clips: int  # selected clips
    thumbnails: int  # clips with images written
    thumbnail_errors: int  # clips whose thumbnail could not be decoded
    seconds: float

    def render(self) -> str:
        errors = f", {self.thumbnail_errors} failed" if self.thumbnail_errors else ""
        return (
            f"report: {self.index_html} ({self.clips:,} clips, {self.thumbnails} thumbnails"
            f"{errors}, {self.seconds:.1f} s)"
        )


def _prepare_out(out_dir: Path) -> Path:
    if out_dir.exists() and not out_dir.is_dir():
        raise StoreError(f"--out {out_dir}: is a file, not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    thumbs = out_dir / "thumbs"
    if thumbs.is_dir():
        shutil.rmtree(thumbs)  # our own images from an earlier report of this directory
    return thumbs


def _open_database(db_uri: str | Path) -> Database:
    if is_local(str(db_uri)) and not Path(local_path(str(db_uri))).is_dir():
        raise StoreError(f"--db {db_uri}: no such database directory")
    return Database(db_uri)


# ------------------------------------------------------------------------------------------
# Thumbnail planning: every section wishes, the budget decides


@dataclass
class _Wish:
    key: str  # "strip:<clip_id>" or "frames:<clip_id>"
    clip: dict[str, Any]
    times_s: list[float]
    strip: bool


class _Planner:
    """Takes wishes from each section in turn (round robin) until `budget` clips are chosen."""

    def __init__(self, budget: int, rotations: dict[str, int | None]) -> None:
        self.budget = budget
        self.rotations = rotations
        self.chosen: dict[str, ThumbRequest] = {}

    def plan(self, wish_lists: list[list[_Wish]]) -> None:
        queues = [list(w) for w in wish_lists]
        while queues and len(self.chosen) < self.budget:
            for queue in queues:
                while queue and queue[0].key in self.chosen:
                    queue.pop(0)
                if queue and len(self.chosen) < self.budget:
                    wish = queue.pop(0)
                    self.chosen[wish.key] = ThumbRequest(
                        wish.clip["clip_id"],
                        wish.clip["uri"],
                        wish.times_s,
                        self.rotations.get(wish.clip.get("video_id") or ""),
                        wish.strip,
                    )
            queues = [q for q in queues if q]

    def get(self, key: str) -> ThumbRequest | None:
        return self.chosen.get(key)


def _strip_wish(clip: dict[str, Any]) -> _Wish:
    times = clip_times(float(clip["start_s"] or 0.0), float(clip["end_s"] or 0.0), STRIP_FRAMES)
    return _Wish(f"strip:{clip['clip_id']}", clip, times, True)


def _rotations(db: Database, video_ids: set[str]) -> dict[str, int | None]:
    """video_id -> clockwise rotation_deg from the videos table (None where unknown)."""
    if not video_ids or not db.has_table(VIDEOS):
        return {}
    dataset = db.table(VIDEOS)
    if "rotation_deg" not in dataset.schema.names:
        return {}
    in_list = ", ".join(sql_string(v) for v in sorted(video_ids))
    rows = dataset.to_table(columns=["video_id", "rotation_deg"], filter=f"video_id IN ({in_list})")
    return {r["video_id"]: r["rotation_deg"] for r in rows.to_pylist()}


# ------------------------------------------------------------------------------------------
# Histograms and their strips


def _band_picks(scan: ScanResult, hist: Histogram) -> list[tuple[str, float, int]]:
    """(band, value, row id) for PER_BAND sampled clips in each decile band of `hist`."""
    values = scan.sample.values[hist.spec.key]
    finite = np.flatnonzero(np.isfinite(values))
    if len(finite) == 0:
        return []
    order = finite[np.argsort(values[finite], kind="stable")]
    picks = []
    for band, low, high in _BANDS:
        start, stop = int(low * len(order)), max(int(high * len(order)), int(low * len(order)) + 1)
        chosen = order[start:stop]
        for index in np.unique(np.linspace(0, len(chosen) - 1, PER_BAND).round().astype(int)):
            row = chosen[index]
            picks.append((band, float(values[row]), int(scan.sample.row_ids[row])))
    return picks


def _marks(
    snapshots: list[Any], where: str | None, label: str
) -> dict[str, list[tuple[str, Threshold]]]:
    """column -> (label, threshold) for every snapshot filter and the selection's filter."""
    marks: dict[str, list[tuple[str, Threshold]]] = {}
    sources = [(s.name, s.where) for s in snapshots if s.table == "clips"]
    sources += [(label, where)] if where else []
    for name, text in sources:
        for threshold in parse_thresholds(text or ""):
            marks.setdefault(threshold.column, []).append((name, threshold))
    return marks


def _chart_note(hist: Histogram, num_rows: int) -> str:
    if hist.total == 0:
        return f"No values: all {num_rows:,} selected clips lack {', '.join(hist.spec.columns)}."
    missing = f", {hist.missing:,} without a value" if hist.missing else ""
    return (
        f"{hist.total:,} clips{missing}; range {hist.low:.4g} to {hist.high:.4g}; median "
        f"{hist.quantile(0.5):.4g}. Thumbnails: deciles of a uniform sample of the selection."
    )


def _charts(
    scan: ScanResult,
    marks: dict[str, list[tuple[str, Threshold]]],
    clips_by_row: dict[int, dict[str, Any]],
    planner: _Planner,
) -> list[page.Chart]:
    out = []
    for hist in scan.histograms:
        edges, counts = hist.display()
        svg, bars = charts.histogram_svg(
            hist.spec.key, edges, counts, hist.spec.unit, marks.get(hist.spec.key, [])
        )
        picks = [
            (band, value, clips_by_row[row], planner.get(f"strip:{clips_by_row[row]['clip_id']}"))
            for band, value, row in _band_picks(scan, hist)
            if row in clips_by_row
        ]
        note = _chart_note(hist, scan.num_rows)
        out.append(page.Chart(hist.spec.key, hist.spec.title, svg, bars, note, page.Strip(picks)))
    return out


# ------------------------------------------------------------------------------------------
# The report


def write_report(
    db_uri: str | Path,
    out_dir: str | Path,
    where: str | None = None,
    snapshot: str | None = None,
    max_thumbnails: int = DEFAULT_MAX_THUMBNAILS,
    progress: bool = True,
) -> ReportSummary:
    """Write `out_dir/index.html`, `out_dir/thumbs/*.jpg` and `out_dir/report.json`.

    Raises StoreError (one line) for a missing database or snapshot, a filter that does not
    parse, or an `out_dir` that is a file; nothing is written then.
    """
    started = time.monotonic()
    if max_thumbnails < 0:
        raise StoreError(f"--max-thumbnails {max_thumbnails}: must be >= 0")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise StoreError(f"--out {out}: is a file, not a directory")
    db = _open_database(db_uri)
    selection = select_clips(db, where, snapshot)
    thumbs_dir = _prepare_out(out)

    scan = scan_scores(selection, SAMPLE_ROWS)
    snapshots = db.list_snapshots()
    view = sections.overview(db, selection, scan)
    summaries = sections.snapshot_summaries(db)
    dsg = sections.dsg_section(db, selection)
    quarantine = sections.quarantine_section(db)
    duplicates = sections.duplicate_section(selection)

    picks = {row for h in scan.histograms for _, _, row in _band_picks(scan, h)}
    sampled = fetch_rows(selection.dataset, np.array(sorted(picks)), sections.CLIP_COLUMNS)
    clips_by_row = {int(r.pop("_rowid")): r for r in sampled.to_pylist()}
    planner = _plan_thumbnails(db, scan, clips_by_row, dsg, duplicates, max_thumbnails)
    requests = list(planner.chosen.values())
    # Decode in a thread while the charts draw: PyAV releases the GIL while it decodes.
    with ThreadPoolExecutor(max_workers=1) as pool:
        decoding = pool.submit(write_thumbnails, requests, thumbs_dir, THUMB_HEIGHT_PX, progress)
        marks = _marks(snapshots, selection.where, "this report's filter")
        chart_list = _charts(scan, marks, clips_by_row, planner)
        category = None
        if scan.categories is not None:
            svg, bars = charts.category_svg(scan.categories)
            category = page.Chart("category", "Categories", svg, bars, "", None)
        decoding.result()
    absent = [
        f"{s.title}: no {', '.join(s.columns)} column in the clips table." for s in scan.absent
    ]
    bodies = {
        "overview": page.overview_html(view),
        "histograms": page.charts_html(chart_list, absent, category),
        "filters": page.filters_html(summaries),
        "dsg": page.dsg_html(dsg, lambda c: planner.get(f"frames:{c}")),
        "quarantine": page.quarantine_html(quarantine),
        "duplicates": page.duplicates_html(duplicates, lambda c: planner.get(f"strip:{c}")),
    }
    generated = f"{db.uri} · {selection.label} · {datetime.now(UTC):%Y-%m-%d %H:%M UTC}"
    index = out / "index.html"
    index.write_text(page.page_html("STIV curation report", bodies, generated), encoding="utf-8")
    _write_json(out / "report.json", selection, scan, requests)
    written = sum(1 for r in requests if r.images)
    return ReportSummary(
        index.absolute(),
        scan.num_rows,
        written,
        sum(1 for r in requests if r.error),
        time.monotonic() - started,
    )


def _plan_thumbnails(
    db: Database,
    scan: ScanResult,
    clips_by_row: dict[int, dict[str, Any]],
    dsg: sections.DsgSection,
    duplicates: sections.DuplicateSection,
    budget: int,
) -> _Planner:
    """Wishes from the histograms (round robin over charts and bands), DSG examples and
    duplicate groups, interleaved so that every section gets thumbnails under a small budget."""
    per_chart = [
        [clips_by_row[row] for _, _, row in _band_picks(scan, h) if row in clips_by_row]
        for h in scan.histograms
    ]
    hist_wishes = [
        _strip_wish(chart[i])
        for i in range(max(map(len, per_chart), default=0))
        for chart in per_chart
        if i < len(chart)
    ]
    dsg_wishes = []
    for example in dsg.examples:
        times = sorted({t for claim in example.claims for t in claim.frame_times_s})
        if times:
            dsg_wishes.append(
                _Wish(f"frames:{example.clip['clip_id']}", example.clip, times, False)
            )
    dup_wishes = [
        _strip_wish(clip) for group in duplicates.groups for clip in [group.kept, *group.duplicates]
    ]
    wishes = [hist_wishes, dsg_wishes, dup_wishes]
    video_ids = {w.clip.get("video_id") for ws in wishes for w in ws} - {None}
    planner = _Planner(budget, _rotations(db, video_ids))
    planner.plan(wishes)
    return planner


def _write_json(
    path: Path, selection: Selection, scan: ScanResult, requests: list[ThumbRequest]
) -> None:
    """The numbers behind the page, for diffing two reports and for bench/report.py."""
    record = {
        "selection": selection.label,
        "clips": scan.num_rows,
        "hours": scan.hours,
        "histograms": {
            h.spec.key: {
                "edges": h.display()[0].tolist(),
                "counts": h.display()[1].tolist(),
                "missing": h.missing,
            }
            for h in scan.histograms
            if h.total
        },
        "categories": scan.categories,
        "thumb_height_px": THUMB_HEIGHT_PX,
        "thumbnails": [asdict(r) for r in requests],
    }
    path.write_text(page.dumps(record), encoding="utf-8")
