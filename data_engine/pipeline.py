"""`stiv curate`: the driver. Videos stream through one Ray Data dataset; finished videos are
committed to Lance as they finish, in small groups, with no barrier between groups.

    uris --map_batches(scan_videos)--> clip rows (+ shared frames) and one end row per video
         [tasks: one streaming decode per video feeds probe, split, sampling and the task
          stages; `data_engine.scan`]
         --map_batches(StageActor) per actor stage--> score columns   [pre-sized actor pools]
         --> driver: a video is finished when its end row and all its clips have arrived;
             every `videos_per_commit` finished videos (or `commit_interval_s`) are committed

A slow video holds up nobody: it is committed whenever it finishes. Exactly once without
transactions across tables: a commit appends the clips of finished videos, then writes their
quarantine rows, then marks them `done`; a rerun first deletes clip rows of videos that are not
`done` (left by a killed job), then redoes those videos. Clip ids are deterministic, so `kill
-9` at any moment and a rerun give the rows of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from data_engine import quarantine as qu
from data_engine import store as st
from data_engine.dataflow import (
    VIDEO_END,
    CurateSummary,
    clip_failures,
    clip_flow_row,
    clips_schema,
    flow_schema,
    flow_table,
    plan_resources,
    run_table_stages,
    stage_dataset,
    start_task,
    task_args,
    write_dsg_claims,
)
from data_engine.inputs import expand_inputs
from data_engine.scan import ClipResult, VideoResult, scan_video
from data_engine.schema import (
    ERRORS,
    VIDEO_SCHEMA,
    conform,
    in_chunks,
)
from data_engine.stages.base import Stage
from data_engine.video import video_id_for
from stiv_core.ray_connect import connect_ray

log = logging.getLogger(__name__)

CLIPS_PER_BLOCK = 8  # clip rows per block leaving a decode task (streams as decoding advances)


# ------------------------------------------------------------------------------------------
# Decode tasks: videos -> flow blocks
# ------------------------------------------------------------------------------------------


def _end_row(end: VideoResult) -> dict[str, Any]:
    record = {
        "uri": end.uri,
        "video_id": end.video_id,
        "num_clips": end.num_clips,
        "info": asdict(end.info) if end.info is not None else None,
        "error": None,
    }
    if end.error is not None:
        error = end.error
        record["error"] = [error.stage, error.error_type, error.message]
    return {"video_id": end.video_id, "uri": end.uri, ERRORS: "[]", VIDEO_END: json.dumps(record)}


def scan_videos(
    batch: pa.Table,
    cfg: Any,
    task_stages: list[type[Stage]],
    keep_frames: bool,
    ship_frames: bool,
    schema: pa.Schema,
    keep_pairs: bool = True,
) -> Iterator[pa.Table]:
    """Ray task: video URIs -> flow blocks (clip rows as their shots end, then an end row)."""
    cpus = cfg.resources.cpus_per_task
    stages = start_task(cfg, task_stages)
    for uri in batch.column("uri").to_pylist():
        rows: list[dict[str, Any]] = []
        for item in scan_video(uri, cfg, stages, keep_frames, cpus, keep_pairs=keep_pairs):
            if isinstance(item, ClipResult):
                rows.append(clip_flow_row(item, ship_frames))
                if len(rows) >= CLIPS_PER_BLOCK:
                    yield flow_table(rows, schema)
                    rows = []
            else:
                rows.append(_end_row(item))
        yield flow_table(rows, schema)
    for stage in stages:
        stage.teardown()


# ------------------------------------------------------------------------------------------
# The driver: finished videos -> commits
# ------------------------------------------------------------------------------------------


@dataclass
class _Video:
    clips: list[pa.Table] = field(default_factory=list)
    received: int = 0
    end: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.end is not None and self.received >= self.end["num_clips"]


class Committer:
    """Collects flow blocks on the driver and commits finished videos (see module docstring)."""

    def __init__(
        self, db: st.Database, cfg: Any, schema: pa.Schema, attempts: dict[str, int],
        summary: CurateSummary, total_videos: int, show_progress: bool,
    ) -> None:  # fmt: skip
        self.db, self.cfg, self.schema = db, cfg, schema
        self.attempts, self.summary = attempts, summary
        self.videos: dict[str, _Video] = {}
        self.finished: list[str] = []
        self.last_commit = time.monotonic()
        self.started = time.monotonic()
        self.progress = _progress(total_videos, show_progress)

    def add(self, block: pa.Table) -> None:
        ends = block.column(VIDEO_END).to_pylist()
        video_ids = block.column("video_id").to_pylist()
        clip_rows = [i for i, e in enumerate(ends) if e is None]
        if clip_rows:
            clips = block.take(clip_rows)
            by_video: dict[str, list[int]] = {}
            for position, i in enumerate(clip_rows):
                by_video.setdefault(video_ids[i], []).append(position)
            for video_id, positions in by_video.items():
                video = self.videos.setdefault(video_id, _Video())
                video.clips.append(clips.take(positions))
                video.received += len(positions)
                self._check(video_id)
        for i, end in enumerate(ends):
            if end is not None:
                video = self.videos.setdefault(video_ids[i], _Video())
                video.end = json.loads(end)
                self._check(video_ids[i])
        due = time.monotonic() - self.last_commit >= self.cfg.commit_interval_s
        if len(self.finished) >= self.cfg.videos_per_commit or (due and self.finished):
            self.commit()

    def _check(self, video_id: str) -> None:
        video = self.videos[video_id]
        if video.finished and video_id not in self.finished:
            self.finished.append(video_id)

    def commit(self) -> None:
        """Append the finished videos' clips, then quarantine rows, then mark them done."""
        if not self.finished:
            return
        videos = [(vid, self.videos.pop(vid)) for vid in self.finished]
        self.finished = []
        good = [v for _, v in videos if v.end["error"] is None]
        tables = [t for v in good for t in v.clips]
        clips = pa.concat_tables(tables) if tables else None
        failures: list[qu.Failure] = []
        if clips is not None and clips.num_rows:
            failures += clip_failures(clips)
            self.db.write(st.CLIPS, conform(clips, self.schema))
            write_dsg_claims(self.db, clips)
            self.summary.clips += clips.num_rows
            self.summary.clip_errors += len(failures)
        now = time.time()
        video_rows, done_ids = [], []
        for video_id, video in videos:
            end = video.end
            info = end["info"] or {}
            record = {name: info.get(name) for name in VIDEO_SCHEMA.names if name in info}
            record.update(video_id=video_id, uri=end["uri"], updated_at=now)
            if end["error"] is None:
                record.update(status="done", num_clips=end["num_clips"])
                done_ids.append(video_id)
                self.summary.videos_done += 1
                self.summary.video_seconds += float(info.get("duration_s") or 0.0)
            else:
                stage, kind, message = end["error"]
                record.update(status="failed", num_clips=0)
                failures.append(qu.Failure(end["uri"], video_id, None, stage, kind, message))
                self.summary.videos_quarantined += 1
            video_rows.append(record)
        # Quarantine first, then video statuses: a video is `done` only once all is committed.
        qu.record(self.db, failures, self.attempts)
        qu.clear(self.db, done_ids)  # a video that succeeded on retry leaves quarantine
        self.db.upsert(st.VIDEOS, pa.Table.from_pylist(video_rows, VIDEO_SCHEMA), "video_id")
        self.summary.commits += 1
        self.last_commit = time.monotonic()
        self._advance(len(videos))

    def _advance(self, videos: int) -> None:
        if self.progress is None:
            return
        elapsed = max(time.monotonic() - self.started, 1e-9)
        self.progress.set_postfix(
            clips=self.summary.clips,
            video_s_per_s=f"{self.summary.video_seconds / elapsed:.2f}",
            refresh=False,
        )
        self.progress.update(videos)

    def close(self) -> None:
        self.commit()
        if self.progress is not None:
            self.progress.close()


def _progress(total: int, show: bool) -> Any:
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="video", desc="curate", file=sys.stderr, dynamic_ncols=True)


def _previous_statuses(db: st.Database) -> dict[str, str]:
    if not db.has_table(st.VIDEOS):
        return {}
    t = db.table(st.VIDEOS).to_table(columns=["video_id", "status"])
    return dict(zip(t.column("video_id").to_pylist(), t.column("status").to_pylist()))


def check_stages_ready(cfg: Any) -> None:
    """Every listed stage's start-up check, before any work (names the config key)."""
    for stage in cfg.selected():
        stage.check_ready(cfg)


def run_curate(
    inputs: list[str],
    db_uri: str,
    cfg: Any,
    address: str | None = None,
    verbose: bool = False,
    show_progress: bool = True,
) -> CurateSummary:
    """Curate `inputs` into the database at `db_uri` (resumable; see module docstring)."""
    started = time.monotonic()
    summary = CurateSummary()
    check_stages_ready(cfg)
    db = st.Database(db_uri, cfg.storage_options or None)
    if not inputs:
        from data_engine.backfill import run_backfill

        return run_backfill(db, cfg, address, summary, started, verbose, show_progress)
    expanded = expand_inputs(inputs, storage_options=db.storage_options)
    summary.notes.extend(expanded.notes)
    statuses = _previous_statuses(db)
    attempts = qu.load_attempts(db)
    todo = []
    for uri in expanded.uris:
        video_id = video_id_for(uri)
        if statuses.get(video_id) == "done" or qu.out_of_attempts(
            attempts, video_id, cfg.max_attempts
        ):
            summary.videos_skipped += 1
        else:
            todo.append(uri)
    stages = cfg.selected()
    if todo:
        connect_ray(address, verbose)
        # Clip rows of videos that are not done were left by a killed run: remove them first.
        for where in in_chunks("video_id", [video_id_for(u) for u in todo]):
            if db.has_table(st.CLIPS):
                db.delete(st.CLIPS, where)
            db.delete(st.DSG_CLAIMS, where)
        schema = clips_schema(db, cfg, stages)
        _curate(todo, db, cfg, stages, schema, attempts, summary, show_progress)
        for table in (st.VIDEOS, st.CLIPS, st.QUARANTINE):
            db.ensure_indexes(table)
    run_table_stages(db, cfg, stages)
    summary.wall_seconds = time.monotonic() - started
    return summary


def _curate(
    todo: list[str], db: st.Database, cfg: Any, stages: list[type[Stage]], schema: pa.Schema,
    attempts: dict[str, int], summary: CurateSummary, show_progress: bool,
) -> None:  # fmt: skip
    import ray.data

    task_stages = [s for s in stages if s.runs_on == "task"]
    actor_stages = [s for s in stages if s.runs_on == "actor"]
    ship_frames = any("frames" in s.reads for s in actor_stages)
    keep_frames = ship_frames or any("frames" in s.reads for s in task_stages)
    keep_pairs = any("pairs" in s.reads for s in stages)
    flow = flow_schema(cfg, stages)
    cfg, plan = plan_resources(cfg, actor_stages)
    ds = ray.data.from_items([{"uri": u} for u in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        scan_videos,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "cfg": cfg,
            "task_stages": task_stages,
            "keep_frames": keep_frames,
            "ship_frames": ship_frames,
            "schema": flow,
            "keep_pairs": keep_pairs,
        },
        **task_args(cfg),
    )
    ds = stage_dataset(ds, cfg, actor_stages, plan)
    committer = Committer(db, cfg, schema, attempts, summary, len(todo), show_progress)
    # No prefetching: Ray Data's prefetcher waits until its window of blocks is complete, so
    # one slow video would hold back the finished ones behind it (measured: a block done at
    # 5.8 s arrived at 12.5 s, with the slow one).
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        committer.add(block)
    committer.close()
