"""`stiv report`: the curation report rendered in a real browser (Debian's headless chromium).

The databases here are real Lance tables written with `Database.write` (the rows the pipeline
writes: videos, clips with scores and provenance, quarantine, dsg_claims, snapshots) over real
H.264 files, one of them portrait through rotation metadata. Nothing is mocked.
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageStat

from data_engine.report import charts
from data_engine.report.build import write_report
from data_engine.report.page import SECTIONS
from data_engine.report.scan import (
    HISTOGRAMS,
    Threshold,
    parse_thresholds,
    scan_scores,
    select_clips,
)
from data_engine.report.thumbs import ThumbRequest, clip_times, write_thumbnails
from data_engine.store import Database
from data_engine.video import clip_id_for, video_id_for
from demos.samples import (
    write_hard_cut_video,
    write_moving_shape_video,
    write_rotated_video,
)
from stiv.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from report_browser import VIEWPORT, render

FPS = 25
CATEGORIES = ["people", "vehicles", "nature and landscapes"]
PROVENANCE = json.dumps({"clip": {"model_name": "stiv-tiny-clip"}, "seeded_test_weights": True})


def _videos(root: Path) -> list[tuple[Path, int, int, int, int]]:
    """(path, frames, display width, display height, rotation_deg) of three real videos."""
    return [
        (write_moving_shape_video(root / "moving.mp4", num_frames=50, pan_px=2.0), 50, 320, 240, 0),
        (write_hard_cut_video(root / "cuts.mp4", (30, 60), 90), 90, 320, 240, 0),
        (write_rotated_video(root / "portrait.mp4", 90, 40), 40, 240, 320, 90),
    ]


def _clip_rows(videos: list[tuple[Path, int, int, int, int]]) -> list[dict]:
    """Clips of 10 frames with seeded scores: motion spread over 0..30, clarity 5..500, ..."""
    rng = np.random.default_rng(0)
    rows = []
    for path, frames, width, height, _ in videos:
        for start in range(0, frames, 10):
            end = min(start + 10, frames)
            rows.append(
                {
                    "clip_id": clip_id_for(video_id_for(str(path)), start, end),
                    "video_id": video_id_for(str(path)),
                    "uri": str(path),
                    "start_frame": start,
                    "end_frame": end,
                    "start_s": start / FPS,
                    "end_s": end / FPS,
                    "duration_s": (end - start) / FPS,
                    "fps": float(FPS),
                    "width": width,
                    "height": height,
                    "orientation": "portrait" if height > width else "landscape",
                    "motion_score": float(rng.uniform(0, 30)),
                    "clarity_score": float(rng.uniform(5, 500)),
                    "aesthetic_score": float(rng.uniform(2, 8)),
                    "ocr_text_area": float(rng.uniform(0, 0.2)),
                    "temporal_consistency": float(rng.uniform(0.8, 1.0)),
                    "category": CATEGORIES[len(rows) % 3],
                    "aesthetic_provenance": PROVENANCE,
                    "category_provenance": PROVENANCE,
                }
            )
    return rows


def _add_dsg(rows: list[dict]) -> list[dict]:
    """Captions and DSG columns on every clip; every third clip hallucinates a 'red umbrella'."""
    claims = []
    for index, row in enumerate(rows):
        hallucinates = index % 3 == 0
        row.update(
            caption=f"A square moves across a textured wall, clip {index}.",
            dsg_status="ok",
            dsg_num_objects=2,
            dsg_num_hallucinated=1 if hallucinates else 0,
            dsg_hallucination_rate=0.5 if hallucinates else 0.0,
            dup_of=rows[0]["clip_id"] if index in (1, 2) else None,
        )
        times = [row["start_s"] + 0.1, row["start_s"] + 0.3]
        for qid, (obj, verdict) in enumerate(
            [("square", "present"), ("red umbrella", "hallucinated" if hallucinates else "present")]
        ):
            claims.append(
                {
                    "clip_id": row["clip_id"],
                    "question_id": qid,
                    "kind": "entity",
                    "object": obj,
                    "question": f"Is there a {obj}?",
                    "depends_on": [],
                    "frame_answers": ["no", "no"] if verdict == "hallucinated" else ["yes"],
                    "frame_times_s": times if verdict == "hallucinated" else times[:1],
                    "verdict": verdict,
                }
            )
    return claims


def _write_db(root: Path, full: bool) -> Database:
    videos = _videos(root / "videos")
    db = Database(root / "db")
    video_rows = [
        {
            "video_id": video_id_for(str(p)),
            "uri": str(p),
            "status": "done",
            "duration_s": n / FPS,
            "fps": float(FPS),
            "num_frames": n,
            "width": w,
            "height": h,
            "rotation_deg": rot,
            "num_clips": -(-n // 10),
            "updated_at": 1.7e9,
        }
        for p, n, w, h, rot in videos
    ]
    clips = _clip_rows(videos)
    if full:
        claims = _add_dsg(clips)
        missing = str(root / "videos" / "missing.mp4")
        video_rows.append({"video_id": video_id_for(missing), "uri": missing, "status": "failed"})
        quarantine = [
            {"quarantine_id": video_id_for(missing), "uri": missing, "video_id": video_id_for(missing),
             "clip_id": None, "stage": "probe", "error_type": "not_found",
             "message": f"{missing}: No such file or directory", "attempts": 3, "updated_at": 1.7e9},
            {"quarantine_id": "q2", "uri": clips[4]["uri"], "video_id": clips[4]["video_id"],
             "clip_id": clips[4]["clip_id"], "stage": "ocr", "error_type": "timeout",
             "message": "ocr exceeded its time budget", "attempts": 1, "updated_at": 1.7e9},
        ]  # fmt: skip
        db.write("quarantine", pa.Table.from_pylist(quarantine))
        db.write("dsg_claims", pa.Table.from_pylist(claims))
    db.write("videos", pa.Table.from_pylist(video_rows))
    db.write("clips", pa.Table.from_pylist(clips))
    if full:
        db.create_snapshot("moving", "motion_score > 2 AND clarity_score BETWEEN 10 AND 400")
        db.create_snapshot("pretty", "aesthetic_score >= 5")
    return db


@pytest.fixture(scope="module")
def full_db(tmp_path_factory: pytest.TempPathFactory) -> Database:
    return _write_db(tmp_path_factory.mktemp("full"), full=True)


@pytest.fixture(scope="module")
def bare_db(tmp_path_factory: pytest.TempPathFactory) -> Database:
    return _write_db(tmp_path_factory.mktemp("bare"), full=False)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["report", *argv])
    return code, capsys.readouterr().err


def _check_page(out: Path) -> dict:
    """The checks every report must pass in the browser; returns the DOM probe."""
    seen = render(out / "index.html")
    shot = Image.open(io.BytesIO(seen.screenshot_png)).convert("L")
    assert shot.size == VIEWPORT
    assert ImageStat.Stat(shot).stddev[0] > 20, "the screenshot is blank"
    probe = seen.probe
    assert [s["id"] for s in probe["sections"]] == [a for a, _ in SECTIONS]
    for section, (anchor, heading) in zip(probe["sections"], SECTIONS):
        assert section["heading"] == heading and section["anchor"] == f"#{anchor}"
    for chart in probe["charts"]:
        assert chart["drawn"] == chart["declared"] > 0, chart
    assert probe["imgs"], "no thumbnails on the page"
    for img in probe["imgs"]:
        assert img["complete"] and img["naturalWidth"] > 0, img
    assert seen.requested_urls and all(u.startswith("file://") for u in seen.requested_urls)
    assert not seen.failed_requests and not seen.console, (seen.failed_requests, seen.console)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", probe["html"], re.I)
    assert "Content-Security-Policy" in probe["html"]
    return probe


def test_full_report_renders_every_section_in_chromium(
    full_db: Database, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Guards the whole deliverable: sections, bars, loaded thumbnails, no network, marks."""
    out = tmp_path / "report"
    code, err = _run(["--db", full_db.uri, "--out", str(out), "--max-thumbnails", "40"], capsys)
    assert code == 0, err
    probe = _check_page(out)
    assert {c["key"] for c in probe["charts"]} == {h.key for h in HISTOGRAMS} | {"category"}
    text = {s["id"]: s["text"] for s in probe["sections"]}
    assert "18 selected of 18" in text["overview"] and "stiv-tiny-clip" in text["overview"]
    assert "moving: &gt; 2" in probe["html"] and "pretty: &gt;= 5" in probe["html"]
    assert "moving: &gt;= 10" in probe["html"]  # BETWEEN on clarity_score
    assert "low decile" in text["histograms"] and "high decile" in text["histograms"]
    assert "motion_score > 2 AND clarity_score BETWEEN 10 AND 400" in text["filters"]
    assert "red umbrella" in text["dsg"] and "DSG-Video_i" in text["dsg"]
    assert "Is there a red umbrella?" in text["dsg"]
    assert "not_found" in text["quarantine"] and "timeout" in text["quarantine"]
    assert "No such file or directory" in text["quarantine"]
    assert "kept" in text["duplicates"] and "duplicate" in text["duplicates"]
    record = json.loads((out / "report.json").read_text())
    assert record["clips"] == 18 and 0 < len(record["thumbnails"]) <= 40


def test_bare_database_still_renders_and_says_what_is_missing(
    bare_db: Database, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No DSG columns, no quarantine table, no dup_of, no snapshot: each section says so."""
    out = tmp_path / "report"
    code, err = _run(["--db", bare_db.uri, "--out", str(out)], capsys)
    assert code == 0, err
    text = {s["id"]: s["text"] for s in _check_page(out)["sections"]}
    assert "No DSG-Video results" in text["dsg"] and "No caption column" in text["dsg"]
    assert "No quarantined videos or clips" in text["quarantine"]
    assert "No dup_of column" in text["duplicates"]
    assert "No snapshots yet" in text["filters"]


def test_where_and_snapshot_select_rows(
    full_db: Database, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--where and --snapshot report on their rows only, at the snapshot's pinned version."""
    where = "motion_score > 2 AND clarity_score BETWEEN 10 AND 400"
    expected = full_db.count("clips", where)
    for argv in (["--where", where], ["--snapshot", "moving"]):
        out = tmp_path / argv[0].strip("-")
        code, err = _run(["--db", full_db.uri, "--out", str(out), *argv], capsys)
        assert code == 0, err
        assert json.loads((out / "report.json").read_text())["clips"] == expected


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--where", "motion_score >"], "--where"),
        (["--snapshot", "no-such-snapshot"], "no such snapshot"),
        (["--out", "FILE"], "is a file"),
        (["--max-thumbnails", "-1"], "--max-thumbnails"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    full_db: Database,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    """A bad filter, a missing snapshot or an --out that is a file stop before any work."""
    a_file = tmp_path / "report.txt"
    a_file.write_text("keep me")
    argv = [str(a_file) if a == "FILE" else a for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    code, err = _run(["--db", full_db.uri, *argv], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert err.startswith("stiv report: error:")
    assert a_file.read_text() == "keep me" and not (tmp_path / "out" / "index.html").exists()


def test_thumbnail_budget_bounds_the_decoding(
    full_db: Database, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-thumbnails caps the clips decoded over all sections; the rest say so."""
    out = tmp_path / "report"
    code, err = _run(["--db", full_db.uri, "--out", str(out), "--max-thumbnails", "3"], capsys)
    assert code == 0, err
    assert len(json.loads((out / "report.json").read_text())["thumbnails"]) == 3
    assert len(list((out / "thumbs").iterdir())) >= 3
    assert "--max-thumbnails reached" in (out / "index.html").read_text()


def test_portrait_thumbnail_is_turned_by_rotation_deg(full_db: Database, tmp_path: Path) -> None:
    """A phone video stored landscape must show upright: the stored top-left red block ends
    up top-right after the 90-degree clockwise display rotation."""
    uri = next(
        p for p in full_db.query("videos", columns=["uri"])["uri"].to_pylist() if "portrait" in p
    )
    request = ThumbRequest("c", uri, clip_times(0.4, 0.8, 3), rotation_deg=90, strip=False)
    write_thumbnails([request], tmp_path, height_px=96, progress=False)
    assert not request.error and len(request.images) == 3
    image = np.asarray(Image.open(tmp_path / request.images[0]))
    height, width, _ = image.shape
    assert height == 96 and width == 72  # portrait 240x320 at 96 px high
    top_right = image[: height // 8, -width // 8 :].mean(axis=(0, 1))
    top_left = image[: height // 8, : width // 8].mean(axis=(0, 1))
    assert top_right[0] > 180 and top_right[1] < 80, top_right
    assert top_left[0] < 180 or top_left[1] > 80, top_left


def test_broken_video_gets_an_error_not_a_crash(tmp_path: Path) -> None:
    """A clip whose file is gone is reported on the page, and the other clips still decode."""
    good = write_moving_shape_video(tmp_path / "ok.mp4", num_frames=20)
    requests = [
        ThumbRequest("gone", str(tmp_path / "gone.mp4"), [0.1], rotation_deg=0),
        ThumbRequest("ok", str(good), clip_times(0.0, 0.8, 3), rotation_deg=0),
    ]
    write_thumbnails(requests, tmp_path / "thumbs", height_px=64, progress=False)
    assert "not_found" in requests[0].error and not requests[0].images
    assert not requests[1].error and len(requests[1].images) == 1


def test_scan_counts_every_selected_row_and_bounds_the_sample(full_db: Database) -> None:
    """Histogram counts add up to the selected rows; the sample never exceeds its size."""
    where = "aesthetic_score >= 5"
    selection = select_clips(full_db, where, None)
    scan = scan_scores(selection, sample_rows=4)
    assert scan.num_rows == full_db.count("clips", where)
    for hist in scan.histograms:
        assert hist.total + hist.missing == scan.num_rows
        assert hist.low <= hist.quantile(0.5) <= hist.high + 1e-9
    assert len(scan.sample.row_ids) == 4
    assert all(
        v[np.isfinite(v)].min() >= 5
        for k, v in scan.sample.values.items()
        if k == "aesthetic_score"
    )
    assert sum(scan.categories.values()) == scan.num_rows


@pytest.mark.parametrize(
    "where, expected",
    [
        ("motion_score > 2", [Threshold("motion_score", ">", 2.0)]),
        ("2.5 <= clarity_score", [Threshold("clarity_score", ">=", 2.5)]),
        (
            "aesthetic_score BETWEEN 4 AND 6.5 AND ocr_text_area < 0.02",
            [
                Threshold("aesthetic_score", ">=", 4.0),
                Threshold("aesthetic_score", "<=", 6.5),
                Threshold("ocr_text_area", "<", 0.02),
            ],
        ),
        ("caption LIKE '%score > 3%' AND dup_of IS NULL", []),
        ("motion_score>1e-3", [Threshold("motion_score", ">", 0.001)]),
    ],
)
def test_parse_thresholds(where: str, expected: list[Threshold]) -> None:
    """Snapshot filters become chart marks; text inside string literals never does."""
    assert parse_thresholds(where) == expected


def test_write_report_rejects_missing_database(tmp_path: Path) -> None:
    """A --db path that does not exist is an error, not a new empty database directory."""
    from data_engine.store import StoreError

    with pytest.raises(StoreError, match="no such database"):
        write_report(tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "nope").exists()


def test_dsg_columns_match_the_captioning_report() -> None:
    """The report's copy of the DSG column names must follow data_engine.captioning.report."""
    from data_engine.captioning.report import REQUIRED_COLUMNS
    from data_engine.report.sections import DSG_COLUMNS

    assert DSG_COLUMNS == REQUIRED_COLUMNS


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (0.0, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (0.0, 8.0, [0.0, 2.0, 4.0, 6.0, 8.0]),
        (-0.7, 34.9, [0.0, 10.0, 20.0, 30.0]),
        (0.0, 1300.0, [0.0, 500.0, 1000.0]),
        (5.0, 5.0, [5.0, 5.2, 5.4, 5.6, 5.8, 6.0]),
    ],
)
def test_nice_ticks_are_round_and_inside(low: float, high: float, expected: list[float]) -> None:
    assert charts.nice_ticks(low, high) == pytest.approx(expected)
    assert charts.covering_ticks(1300.0)[-1] == 1500.0


def test_histogram_svg_is_valid_xml_with_one_rect_per_nonempty_bin_and_marks_inside() -> None:
    import xml.etree.ElementTree as ET

    counts = np.array([0, 3, 0, 7, 1])
    marks = [
        ("snap-a", Threshold("aesthetic_score", ">", 0.3)),
        ("snap-b", Threshold("aesthetic_score", "<=", 1.4)),  # right of the bins
    ]
    svg, bars = charts.histogram_svg("aesthetic", np.linspace(0, 1, 6), counts, "score", marks)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    rects = root.findall(f"{ns}rect")
    assert bars == len(rects) == 3
    assert [r.get("id") for r in rects] == [f"chart-aesthetic-bar-{i}" for i in range(3)]
    heights = [float(r.get("height")) for r in rects]
    assert heights[1] > heights[0] > heights[2] > 0  # 7 > 3 > 1
    lines = {ln.get("id"): float(ln.get("x1")) for ln in root.findall(f"{ns}line") if ln.get("id")}
    assert set(lines) == {"chart-aesthetic-mark-0", "chart-aesthetic-mark-1"}
    width = float(root.get("width"))
    assert 0 < lines["chart-aesthetic-mark-0"] < lines["chart-aesthetic-mark-1"] < width
    labels = [t for t in root.findall(f"{ns}text") if t.text and t.text.startswith("snap-")]
    assert [t.text for t in labels] == ["snap-a: > 0.3", "snap-b: <= 1.4"]
    assert labels[1].get("text-anchor") == "end"  # would leave the canvas on the right


def test_category_svg_orders_bars_largest_first() -> None:
    import xml.etree.ElementTree as ET

    svg, bars = charts.category_svg({"sports": 120, "nature and landscape": 1300, "cooking": 7})
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    widths = [float(r.get("width")) for r in root.findall(f"{ns}rect")]
    assert bars == 3 and widths == sorted(widths, reverse=True)
    names = [t.text for t in root.findall(f"{ns}text")][:3]
    assert names == ["nature and landscape", "sports", "cooking"]
