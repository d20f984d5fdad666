"""The curation engine's contract: stages added through the public stage contract, per-clip
failures, commits that do not wait for slow videos, retry budgets and decode deadlines.
Real embedded Ray, real Lance, real videos."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pytest
import ray.cloudpickle

from data_engine.config import load_curate_config
from data_engine.pipeline import run_curate
from data_engine.scan import VideoResult, scan_video
from data_engine.stage_list import STAGES
from data_engine.stages.base import ClipInput, Stage, score_each
from data_engine.store import Database, StoreError
from demos import samples

# Ray workers import this module by value: its toy stages exist only here.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPO = Path(__file__).resolve().parents[2]
FAST = ["split.min_clip_s=0.8", "sampling.frames_per_clip=3"]


class BrightnessStage(Stage):
    """A toy scorer added through the public contract only: mean brightness of the sampled
    frames. Fails on purpose for clips whose row asks it to (see `FAIL_ON`)."""

    name: ClassVar[str] = "brightness"
    runs_on: ClassVar[str] = "actor"
    FAIL_ON: ClassVar[str] = "cuts.mp4"  # the middle shot of this video fails

    @classmethod
    def output_schema(cls, cfg: Any) -> pa.Schema:
        return pa.schema([("brightness", pa.float32()), ("brightness_provenance", pa.string())])

    def __call__(self, batch: list[ClipInput]) -> list[dict[str, Any]]:
        def score(item: ClipInput) -> dict[str, Any]:
            row = item.row
            if row["uri"].endswith(self.FAIL_ON) and 0 < row["start_frame"] < 60:
                raise RuntimeError("toy failure on the middle shot")
            return {
                "brightness": float(item.frames.frames.mean()),
                "brightness_provenance": '{"method": "mean"}',
            }

        return score_each(batch, score)


class SlowTaskStage(Stage):
    """A toy in-pass stage that holds any clip of a video named `slow*` for up to `SECONDS`,
    until the test releases it (a file `RELEASE` beside the inputs' directory)."""

    name: ClassVar[str] = "slowpoke"
    runs_on: ClassVar[str] = "task"
    SECONDS: ClassVar[float] = 25.0
    RELEASE: ClassVar[str] = "release-slowpoke"

    @classmethod
    def output_schema(cls, cfg: Any) -> pa.Schema:
        return pa.schema([("slowpoke_s", pa.float32())])

    def __call__(self, batch: list[ClipInput]) -> list[dict[str, Any]]:
        out = []
        for item in batch:
            slow = Path(item.row["uri"]).name.startswith("slow")
            release = Path(item.row["uri"]).parent.parent / self.RELEASE
            deadline = time.monotonic() + self.SECONDS
            while slow and not release.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            out.append({"slowpoke_s": self.SECONDS if slow else 0.0})
        return out


TOY_STAGES = (*STAGES, BrightnessStage, SlowTaskStage)


def _config(stages: str, *extra: str):
    return load_curate_config(None, [*FAST, *extra], stages, stage_classes=TOY_STAGES)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("engine-videos")
    samples.write_moving_shape_video(root / "moving.mp4", num_frames=50)
    samples.write_hard_cut_video(root / "cuts.mp4", cut_frames=(30, 60), num_frames=90)
    samples.write_static_video(root / "static.mp4", num_frames=40)
    return root


def test_loading_a_curation_config_imports_no_model_library() -> None:
    """`stiv curate --help`-speed config checks: torch, open_clip and rapidocr load only where a
    stage runs (its `setup`), never when the config is read."""
    code = (
        "import sys\n"
        "from data_engine.config import load_curate_config\n"
        "cfg = load_curate_config('pipelines/curate-demo.yaml')\n"
        "heavy = [m for m in ('torch', 'open_clip', 'rapidocr', 'onnxruntime') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_a_stage_added_through_the_contract_runs_end_to_end_and_fails_per_clip(
    ray_session, videos: Path, tmp_path: Path
) -> None:
    """A toy stage in this test module (one class, one tuple entry) gets its YAML section
    and `--stages` word, runs in an actor pool and writes its column. Its failure on one clip
    quarantines that clip only: the video is done and its other clips keep their scores."""
    cfg = _config("probe,split,brightness")
    summary = run_curate([str(videos)], str(tmp_path / "db"), cfg, show_progress=False)
    assert summary.videos_done == 3 and summary.videos_quarantined == 0

    db = Database(tmp_path / "db")
    clips = db.table("clips").to_table().to_pylist()
    cuts = sorted(
        (c for c in clips if c["uri"].endswith("cuts.mp4")), key=lambda c: c["start_frame"]
    )
    assert len(cuts) == 3, "the failing clip is still written"
    assert cuts[1]["brightness"] is None
    assert all(
        c["brightness"] is not None and 0 <= c["brightness"] <= 255
        for c in clips
        if c is not cuts[1]
    )
    quarantine = db.table("quarantine").to_table().to_pylist()
    assert [(q["clip_id"], q["stage"]) for q in quarantine] == [(cuts[1]["clip_id"], "brightness")]
    assert "toy failure" in quarantine[0]["message"]
    videos_table = {Path(r["uri"]).name: r for r in db.table("videos").to_table().to_pylist()}
    assert videos_table["cuts.mp4"]["status"] == "done"


def test_backfill_of_a_failing_clip_stops_at_max_attempts(
    ray_session, videos: Path, tmp_path: Path
) -> None:
    """Backfill retries a clip whose stage failed, counting attempts, and stops at
    max_attempts: a deterministic failure is not retried for ever."""
    db_uri = str(tmp_path / "db")
    run_curate([str(videos)], db_uri, _config("probe,split"), show_progress=False)
    backfill = _config("brightness", "max_attempts=2")
    first = run_curate([], db_uri, backfill, show_progress=False)
    assert first.clips == 5 and first.clip_errors == 1
    second = run_curate([], db_uri, backfill, show_progress=False)
    assert second.clips == 1 and second.clip_errors == 1, "only the failed clip is redone"
    third = run_curate([], db_uri, backfill, show_progress=False)
    assert third.clips == 0 and any("out of attempts" in n for n in third.notes)
    (row,) = Database(db_uri).table("quarantine").to_table().to_pylist()
    assert row["attempts"] == 2 and row["stage"] == "brightness"


def test_backfill_of_probe_or_split_says_why(ray_session, videos: Path, tmp_path: Path) -> None:
    """`--stages split` without INPUT cannot re-split existing clips: it says so instead of
    silently doing nothing."""
    db_uri = str(tmp_path / "db")
    run_curate([str(videos / "static.mp4")], db_uri, _config("probe,split"), show_progress=False)
    with pytest.raises(StoreError, match="probe and split run only on new videos"):
        run_curate([], db_uri, _config("split"), show_progress=False)


@pytest.mark.slow
def test_a_slow_video_does_not_delay_the_commit_of_the_others(
    ray_session, videos: Path, tmp_path: Path
) -> None:
    """Videos stream through one dataset and are committed as they finish: while one video
    is still being processed, the others are already `done` in the table."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "slow.mp4").symlink_to(videos / "static.mp4")
    for name in ("moving.mp4", "cuts.mp4"):
        (inputs / name).symlink_to(videos / name)
    db_uri = str(tmp_path / "db")
    cfg = _config("probe,split,slowpoke", "videos_per_commit=1", "commit_interval_s=0.1")
    done = threading.Event()
    worker = threading.Thread(
        target=lambda: (run_curate([str(inputs)], db_uri, cfg, show_progress=False), done.set())
    )
    worker.start()
    db = Database(db_uri)
    seen: set[str] = set()
    deadline = time.monotonic() + SlowTaskStage.SECONDS
    while time.monotonic() < deadline and not done.is_set():
        if db.has_table("videos"):
            rows = db.table("videos").to_table(columns=["uri", "status"]).to_pylist()
            seen = {Path(r["uri"]).name for r in rows if r["status"] == "done"}
            if {"moving.mp4", "cuts.mp4"} <= seen:
                break
        time.sleep(0.2)
    slow_finished_first = done.is_set()
    (tmp_path / SlowTaskStage.RELEASE).touch()
    worker.join(timeout=120)
    assert {"moving.mp4", "cuts.mp4"} <= seen and "slow.mp4" not in seen
    assert not slow_finished_first
    rows = db.table("videos").to_table(columns=["uri", "status"]).to_pylist()
    assert {Path(r["uri"]).name for r in rows if r["status"] == "done"} == {
        "moving.mp4", "cuts.mp4", "slow.mp4",
    }  # fmt: skip


def test_a_long_video_passes_a_per_second_budget_that_a_fixed_one_would_fail(
    tmp_path: Path,
) -> None:
    """The decode budget is a base plus a cost per second of video: a 60 s video gets a minute
    where the base alone (0.05 s) would quarantine it."""
    rng = np.random.default_rng(0)
    frames = (
        np.full((120, 160, 3), 40 + i % 200, np.uint8) + rng.integers(0, 8, (120, 160, 3), np.uint8)
        for i in range(600)
    )
    path = samples.write_video(tmp_path / "long.mp4", frames, fps=10)
    scaled = _config("probe,split", "split.timeout_s=0.05", "split.timeout_per_video_s=1.0")
    *_, end = scan_video(str(path), scaled, [], keep_frames=False)
    assert isinstance(end, VideoResult) and end.error is None
    assert end.info.num_frames == 600 and end.num_clips >= 3

    fixed = _config("probe,split", "split.timeout_s=0.05", "split.timeout_per_video_s=0")
    *_, end = scan_video(str(path), fixed, [], keep_frames=False)
    assert end.error is not None and end.error.error_type == "timeout"


def _ramps_with_a_cut(num_frames: int) -> Iterator[np.ndarray]:
    """Colour ramps and a moving square, with a hard cut halfway."""
    columns, rows = np.arange(160)[None, :], np.arange(96)[:, None]
    for i in range(num_frames):
        image = np.zeros((96, 160, 3), np.uint8)
        image[..., 0] = (columns * 3 + i * 4) % 256
        image[..., 1] = rows * 2
        if i >= num_frames // 2:
            image[..., 0], image[..., 2] = 255 - image[..., 0], 200
        x = (i * 5) % 140
        image[10:30, x : x + 20] = 255
        yield image


def test_clip_times_are_the_frames_timestamps_at_a_variable_frame_rate(tmp_path: Path) -> None:
    """start_s and end_s are the timestamps of a clip's first frame and of the frame after it
    (the video's end for the last clip), not frame / fps: here every third frame comes 90 ms
    after the one before and the others 20 ms, so frame / fps would drift by ~0.1 s a clip."""
    import av

    gaps = [90 if i % 3 == 0 else 20 for i in range(120)]
    path = samples.write_video(
        tmp_path / "vfr.mkv", _ramps_with_a_cut(len(gaps)), fps=24, frame_gaps_ms=gaps
    )
    with av.open(str(path)) as container:
        times = [float(f.time) for f in container.decode(video=0)]
    cfg = _config("probe,split", "split.min_clip_s=1.0")
    *clips, end = scan_video(str(path), cfg, [], keep_frames=False)
    assert end.error is None and len(clips) == 2
    for clip in clips:
        row = clip.row
        assert row["start_s"] == pytest.approx(times[row["start_frame"]], abs=1e-6)
        if row["end_frame"] < len(times):
            assert row["end_s"] == pytest.approx(times[row["end_frame"]], abs=1e-6)
        else:
            assert row["end_s"] == pytest.approx(times[-1] + 1 / end.info.fps, abs=1e-6)
        assert row["duration_s"] == pytest.approx(row["end_s"] - row["start_s"])
    # frame / fps would be off by more than a frame's gap here.
    first = clips[0].row
    assert abs(first["end_frame"] / end.info.fps - first["end_s"]) > 0.05


class StallingReader:
    """A file object that delivers its first bytes and then stalls, as a hung object-store
    read does (each read waits longer than the whole budget)."""

    def __init__(self, path: Path, stall_after_bytes: int, stall_s: float) -> None:
        self.handle = open(path, "rb")  # noqa: SIM115  (closed by the decoder via close())
        self.stall_after_bytes = stall_after_bytes
        self.stall_s = stall_s

    def read(self, size: int = -1) -> bytes:
        if self.handle.tell() >= self.stall_after_bytes:
            time.sleep(self.stall_s)
        return self.handle.read(size if size > 0 else 1 << 16)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()

    def close(self) -> None:
        self.handle.close()


def test_a_stalled_decode_is_stopped(tmp_path: Path) -> None:
    """A source that stops delivering is stopped at its deadline with a `timeout`, instead of
    holding the worker for ever."""
    rng = np.random.default_rng(1)
    noise = (rng.integers(0, 255, (240, 320, 3), np.uint8) for _ in range(60))
    path = samples.write_video(tmp_path / "noise.mp4", noise)  # ~1 MB: many reads
    cfg = _config("probe,split", "split.timeout_s=1.0", "split.timeout_per_video_s=0")
    reader = StallingReader(path, stall_after_bytes=path.stat().st_size // 4, stall_s=1.5)
    started = time.monotonic()
    results = list(scan_video(str(path), cfg, [], keep_frames=False, source=reader))
    assert time.monotonic() - started < 10
    end = results[-1]
    assert isinstance(end, VideoResult) and end.error is not None
    assert end.error.error_type == "timeout"
