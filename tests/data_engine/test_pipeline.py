"""End-to-end curation: real embedded Ray, real Lance, real (synthetic and bad) videos."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_engine.config import load_curate_config
from data_engine.pipeline import run_curate
from data_engine.store import Database
from demos import samples

STIV = [sys.executable, "-m", "stiv.cli"]
# Short test videos: keep 1-second clips so every synthetic shot survives.
FAST = ["split.min_clip_s=0.8", "sampling.frames_per_clip=3"]


def _make_videos(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [
        samples.write_moving_shape_video(directory / "moving.mp4", num_frames=50),
        samples.write_static_video(directory / "static.mp4", num_frames=40),
        samples.write_hard_cut_video(directory / "cuts.mp4", cut_frames=(30, 60), num_frames=90),
        samples.write_blurred_video(directory / "blurred.mp4", num_frames=40),
    ]


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    _make_videos(root / "good")
    samples.write_bad_inputs(root / "bad")
    (root / "empty").mkdir()
    return root


def _rows(db: Database, table: str, drop=("updated_at",)) -> list[dict]:
    rows = db.table(table).to_table().to_pylist()
    rows = [{k: v for k, v in r.items() if k not in drop} for r in rows]
    key = "clip_id" if table == "clips" else "video_id"
    return sorted(rows, key=lambda r: r[key])


def test_curate_good_and_bad_inputs(ray_session, video_dir: Path, tmp_path: Path) -> None:
    """Every bad input kind is quarantined with its reason, none stops the job, every good
    video is finished, and an empty directory is reported rather than crashing."""
    cfg = load_curate_config(None, FAST)
    bad = samples.write_bad_inputs(tmp_path / "bad")
    inputs = [str(video_dir / "good"), str(video_dir / "empty"), *map(str, bad.values())]
    summary = run_curate(inputs, str(tmp_path / "db"), cfg)
    assert summary.videos_done == 4
    assert summary.videos_quarantined == len(bad)
    assert any("no videos found" in n for n in summary.notes)

    db = Database(tmp_path / "db")
    quarantine = {Path(r["uri"]).name: r for r in db.table("quarantine").to_table().to_pylist()}
    assert set(quarantine) == {p.name for p in bad.values()}
    assert quarantine["missing.mp4"]["error_type"] == "not_found"
    assert quarantine["zero_bytes.mp4"]["error_type"] == "empty_file"
    assert all(
        r["stage"] == "probe" and r["message"] and r["clip_id"] is None for r in quarantine.values()
    )

    clips = db.table("clips").to_table().to_pylist()
    by_video = {}
    for c in clips:
        by_video.setdefault(Path(c["uri"]).name, []).append(c)
    assert len(by_video["cuts.mp4"]) == 3, "two hard cuts give three clips"
    moving = by_video["moving.mp4"][0]["motion_score"]
    static = by_video["static.mp4"][0]["motion_score"]
    assert static < 0.1 * moving
    videos = {Path(r["uri"]).name: r for r in db.table("videos").to_table().to_pylist()}
    assert videos["cuts.mp4"]["num_clips"] == 3 and videos["cuts.mp4"]["status"] == "done"
    assert videos["missing.mp4"]["status"] == "failed"
    assert len({c["clip_id"] for c in clips}) == len(clips)


def test_rerun_does_no_work_and_never_duplicates(
    ray_session, video_dir: Path, tmp_path: Path
) -> None:
    """Resume: a second run over the same inputs skips done videos, retries failed ones only
    up to max_attempts, and writes no duplicate rows."""
    cfg = load_curate_config(None, [*FAST, "max_attempts=2"])
    inputs = [str(video_dir / "good"), str(video_dir / "bad")]
    db_uri = str(tmp_path / "db")
    first = run_curate(inputs, db_uri, cfg)
    db = Database(db_uri)
    clips_before = _rows(db, "clips")
    second = run_curate(inputs, db_uri, cfg)
    assert second.videos_done == 0 and second.videos_skipped == first.videos_done
    assert second.videos_quarantined == first.videos_quarantined  # retried (attempt 2)
    third = run_curate(inputs, db_uri, cfg)
    assert third.videos_quarantined == 0, "out of attempts: not retried again"
    assert _rows(db, "clips") == clips_before
    attempts = {r["attempts"] for r in db.table("quarantine").to_table().to_pylist()}
    assert attempts == {2}


@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_the_uninterrupted_rows(
    ray_session, tmp_path: Path
) -> None:
    """Killing the job (SIGKILL, whole process group incl. its embedded Ray) after some
    videos are committed and rerunning ends with exactly the rows of an uninterrupted run."""
    videos = tmp_path / "videos"
    for i in range(3):
        _make_videos(videos / f"set{i}")
    args = ["--set", "videos_per_commit=1"] + [a for f in FAST for a in ("--set", f)]

    reference = tmp_path / "reference"
    cfg = load_curate_config(None, ["videos_per_commit=1", *FAST])
    run_curate([str(videos)], str(reference), cfg)

    killed = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [*STIV, "curate", str(videos), "--db", str(killed), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
    )  # fmt: skip
    db = Database(killed)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if db.has_table("videos") and db.table("videos").count_rows() >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = db.table("videos").count_rows()
    assert 2 <= done_at_kill < 12, "the kill must land midway"

    run_curate([str(videos)], str(killed), cfg)
    assert _rows(Database(killed), "clips") == _rows(Database(reference), "clips")
    assert _rows(Database(killed), "videos") == _rows(Database(reference), "videos")


def test_query_and_snapshot_pin_rows_after_growth(
    ray_session, video_dir: Path, tmp_path: Path
) -> None:
    """A snapshot records its filter and pins the table version: the rows it selected stay
    readable after more videos are appended."""
    cfg = load_curate_config(None, FAST)
    db_uri = str(tmp_path / "db")
    run_curate(
        [str(video_dir / "good" / "moving.mp4"), str(video_dir / "good" / "static.mp4")],
        db_uri,
        cfg,
    )
    db = Database(db_uri)
    snap = db.create_snapshot("moving", "motion_score > 1.0")
    assert snap.num_rows == 1
    run_curate([str(video_dir / "good")], db_uri, cfg)
    assert db.count("clips", "motion_score > 1.0") > 1
    pinned = db.read_snapshot("moving")
    assert pinned.num_rows == 1 and Path(pinned.column("uri")[0].as_py()).name == "moving.mp4"
    rows = db.query(where="motion_score > 0", columns=["clip_id", "motion_score"],
                    order_by="motion_score", desc=True, limit=2)  # fmt: skip
    scores = rows.column("motion_score").to_pylist()
    assert rows.column_names == ["clip_id", "motion_score"] and scores == sorted(
        scores, reverse=True
    )


def _stiv(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*STIV, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_cli_rejects_bad_config_filter_and_stage_before_work(
    video_dir: Path, tmp_path: Path
) -> None:
    """Bad input to the CLI exits non-zero with one line naming the problem, before any work
    (no database is created)."""
    db = tmp_path / "db"
    bad_set = _stiv(
        "curate", str(video_dir / "good"), "--db", str(db), "--set", "split.min_clip_s=-1"
    )
    assert bad_set.returncode == 2 and "split.min_clip_s" in bad_set.stderr
    assert len(bad_set.stderr.strip().splitlines()) == 1
    unknown = _stiv("curate", str(video_dir / "good"), "--db", str(db), "--set", "split.nope=1")
    assert unknown.returncode == 2 and "split.nope" in unknown.stderr
    stage = _stiv("curate", str(video_dir / "good"), "--db", str(db), "--stages", "probe,warp")
    assert stage.returncode == 2 and "'warp'" in stage.stderr
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("sampling:\n  frames_per_clip: zero\n")
    bad_yaml = _stiv("curate", str(video_dir / "good"), "--db", str(db), "--config", str(cfg_file))
    assert bad_yaml.returncode == 2 and "sampling.frames_per_clip" in bad_yaml.stderr
    assert not (db / "clips.lance").exists()


def test_cli_query_count_json_and_bad_filter(ray_session, video_dir: Path, tmp_path: Path) -> None:
    """`stiv query` prints counts, JSON rows and snapshots per the CLI contract; a bad filter
    is one line on stderr with exit code 2."""
    import json

    db = str(tmp_path / "db")
    run_curate([str(video_dir / "good")], db, load_curate_config(None, FAST))
    count = _stiv("query", "--db", db, "--where", "motion_score >= 0", "--count")
    assert count.returncode == 0 and int(count.stdout) == Database(db).count("clips")
    rows = json.loads(
        _stiv("query", "--db", db, "--columns", "clip_id,duration_s", "--format", "json").stdout
    )
    assert rows and set(rows[0]) == {"clip_id", "duration_s"}
    bad = _stiv("query", "--db", db, "--where", "motion_score >>> 2")
    assert (
        bad.returncode == 2
        and "--where" in bad.stderr
        and len(bad.stderr.strip().splitlines()) == 1
    )
    unknown_col = _stiv("query", "--db", db, "--columns", "nope")
    assert unknown_col.returncode == 2 and "nope" in unknown_col.stderr
    made = _stiv("snapshot", "create", "--db", db, "--name", "all", "--where", "duration_s > 0")
    assert made.returncode == 0, made.stderr
    listed = json.loads(_stiv("snapshot", "list", "--db", db, "--format", "json").stdout)
    assert [s["name"] for s in listed["snapshots"]] == ["all"]
    again = _stiv("snapshot", "create", "--db", db, "--name", "all")
    assert again.returncode == 2 and "already exists" in again.stderr


def test_sidecar_captions_are_read_with_provenance(
    ray_session, video_dir: Path, tmp_path: Path
) -> None:
    """Datasets that ship captions (`<stem>.txt` beside each video) fill `caption` without a
    model; a video without one keeps a null caption instead of an invented one."""
    root = tmp_path / "in"
    root.mkdir()
    shutil.copy(video_dir / "good" / "moving.mp4", root / "moving.mp4")
    shutil.copy(video_dir / "good" / "static.mp4", root / "static.mp4")
    (root / "moving.txt").write_text("a white square moving right\n")
    cfg = load_curate_config(None, [*FAST, "caption.backend=sidecar"], "probe,split,motion,caption")
    run_curate([str(root)], str(tmp_path / "db"), cfg)
    rows = {
        Path(r["uri"]).name: r
        for r in Database(tmp_path / "db").table("clips").to_table().to_pylist()
    }
    assert rows["moving.mp4"]["caption"] == "a white square moving right"
    assert rows["moving.mp4"]["caption_backend"] == "sidecar"
    assert rows["static.mp4"]["caption"] is None
