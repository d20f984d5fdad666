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
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from data_engine import quarantine as qu
from data_engine import store as st
from data_engine.captioning.dsg import DSG_CLAIMS_JSON, DSGChecker
from data_engine.frames import ClipFrames, pack_frames, unpack_frames
from data_engine.inputs import expand_inputs
from data_engine.scan import ClipResult, VideoResult, scan_video
from data_engine.schema import (
    CLIP_CORE_SCHEMA,
    ERRORS,
    FRAME_COLUMNS,
    FRAMES,
    FRAMES_SHAPE,
    PAIR_DT,
    PAIR_FRAMES,
    TIMES,
    TRANSIENT_FIELDS,
    VIDEO_SCHEMA,
    conform,
    in_chunks,
    is_transient,
    join_schemas,
)
from data_engine.stages.base import ClipInput, Stage
from data_engine.video import video_id_for
from stiv_core.ray_connect import connect_ray

log = logging.getLogger(__name__)

VIDEO_END = "_video_end"  # transient: JSON of a video's end row (null on clip rows)
CLIPS_PER_BLOCK = 8  # clip rows per block leaving a decode task (streams as decoding advances)


# ------------------------------------------------------------------------------------------
# Schemas of this run
# ------------------------------------------------------------------------------------------


def stage_columns(cfg: Any, stages: list[type[Stage]]) -> pa.Schema:
    """The clip columns the listed scoring stages write (transient ones included)."""
    return join_schemas(
        s.output_schema(cfg) for s in stages if s.runs_on in ("task", "actor", "table")
    )


def flow_schema(cfg: Any, stages: list[type[Stage]]) -> pa.Schema:
    """Schema of every block between the decode tasks, the actors and the driver."""
    return join_schemas(
        [
            CLIP_CORE_SCHEMA,
            stage_columns(cfg, [s for s in stages if s.runs_on != "table"]),
            TRANSIENT_FIELDS,
            [pa.field(VIDEO_END, pa.string())],
        ]
    )


def clips_schema(db: st.Database, cfg: Any, stages: list[type[Stage]]) -> pa.Schema:
    """The clips table's schema after this run: what exists plus this run's new columns (added
    to an existing table first, null for old rows: schema evolution)."""
    columns = [f for f in stage_columns(cfg, stages) if not is_transient(f.name)]
    wanted = join_schemas([CLIP_CORE_SCHEMA, columns])
    if not db.has_table(st.CLIPS):
        return wanted
    table = db.table(st.CLIPS)
    missing = [f for f in wanted if f.name not in table.schema.names]
    if missing:
        table.add_columns(pa.schema(missing))
    return db.table(st.CLIPS).schema


# ------------------------------------------------------------------------------------------
# Rows in flight
# ------------------------------------------------------------------------------------------


def clip_flow_row(clip: ClipResult, ship_frames: bool) -> dict[str, Any]:
    row = dict(clip.row)
    row[ERRORS] = json.dumps(clip.errors)
    if ship_frames and clip.frames is not None:
        row[FRAMES], row[FRAMES_SHAPE] = pack_frames(clip.frames.frames)
        row[PAIR_FRAMES], _ = pack_frames(clip.frames.pair_frames)
        row[PAIR_DT] = clip.frames.pair_dt_s.astype(np.float64).tolist()
        row[TIMES] = clip.frames.times_s.astype(np.float64).tolist()
    return row


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


def flow_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema)


def frames_of(row: dict[str, Any], frames_column: Any, index: int) -> ClipFrames | None:
    """The shared frames of one flow row (None when none were shipped)."""
    raw = frames_column[FRAMES][index].as_py()
    if not raw:
        return None
    shape = frames_column[FRAMES_SHAPE][index].as_py()
    frames = unpack_frames(raw, shape)
    pair_raw = frames_column[PAIR_FRAMES][index].as_py()
    pairs = (
        unpack_frames(pair_raw, shape) if pair_raw else np.zeros((0, *frames.shape[1:]), np.uint8)
    )
    return ClipFrames(
        frames,
        np.asarray(row[TIMES] or [], np.float64),
        pairs,
        np.asarray(row[PAIR_DT] or [], np.float64),
    )


def start_task(cfg: Any, task_stages: list[type[Stage]]) -> list[Stage]:
    """In a decode task: set OpenCV's threads on purpose (Ray runs a task with one OMP thread
    per reserved CPU; OpenCV and FFmpeg do not look) to the task's CPUs, rounded up, and set up
    the in-pass stages."""
    import cv2

    cv2.setNumThreads(max(1, math.ceil(cfg.resources.cpus_per_task)))
    stages = [cls(cfg) for cls in task_stages]
    for stage in stages:
        stage.setup()
    return stages


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


class StageActor:
    """One actor stage in a Ray actor: loads its model once, scores batches of clip rows from
    their shared frames, records a clip's error on that clip. End rows pass through."""

    def __init__(self, stage_cls: type[Stage], cfg: Any, drop_frames: bool) -> None:
        self.stage = stage_cls(cfg)
        self.stage.setup()
        self.name = stage_cls.name
        self.output = stage_cls.output_schema(cfg)
        self.reads_frames = "frames" in stage_cls.reads
        self.drop_frames = drop_frames

    def __call__(self, batch: pa.Table) -> pa.Table:
        frames_column = batch.select([FRAMES, FRAMES_SHAPE, PAIR_FRAMES])
        rows = batch.drop_columns([FRAMES, FRAMES_SHAPE, PAIR_FRAMES]).to_pylist()
        todo = [i for i, r in enumerate(rows) if r[VIDEO_END] is None]
        inputs = [
            ClipInput(rows[i], frames_of(rows[i], frames_column, i) if self.reads_frames else None)
            for i in todo
        ]
        results: list[dict[str, Any]] = [{} for _ in rows]
        for i, result in zip(todo, self.stage(inputs) if inputs else []):
            results[i] = result
            if "error" in result:
                errors = json.loads(rows[i][ERRORS])
                errors.append([self.name, "stage_error", str(result["error"])])
                rows[i][ERRORS] = json.dumps(errors)
        columns = {name: batch.column(name) for name in batch.column_names}
        for f in self.output:
            values = [None if "error" in r else r.get(f.name) for r in results]
            columns[f.name] = pa.array(values, type=f.type)
        columns[ERRORS] = pa.array([r[ERRORS] for r in rows], pa.string())
        out = pa.table(columns)
        if self.drop_frames:
            out = out.drop_columns([c for c in FRAME_COLUMNS if c in out.column_names])
        return out

    def __del__(self) -> None:
        try:
            self.stage.teardown()
        except Exception:  # a failed teardown at exit must not hide the job's real outcome
            log.debug("teardown of %s failed", self.name, exc_info=True)


# ------------------------------------------------------------------------------------------
# Resources
# ------------------------------------------------------------------------------------------


MODEL_CPU_SHARE = 0.25  # auto: share of the cluster's CPUs reserved for model actor pools


def plan_resources(cfg: Any, stages: list[type[Stage]]) -> tuple[Any, dict[str, dict[str, Any]]]:
    """(config with `resources.cpus_per_task` resolved, per actor stage: pool size, CPUs and
    GPUs per actor, batch size). `resources.<stage>` wins; then the global `resources.*`; then
    values derived from `ray.cluster_resources()`.

    Every pool starts at full size (min == max), so all pools together must fit beside the
    decode tasks, or the job waits for ever (docs/design-notes.md, "The 2-core trap"). When
    nothing is set, model actors reserve a quarter of the CPUs and each decode task the rest
    divided by the CPU count (at most 1): on 2 cores one OCR actor (0.5) and two decode tasks
    (0.75 each) all run, sharing the cores. Reserving a whole CPU for the actor instead left
    one decode task running and made `+ocr` cost 2.06x (bench/curate_e2e.py, 48 files).
    """
    import copy

    import ray

    cluster = ray.cluster_resources()
    total = cluster.get("CPU", 1.0)
    defaults = cfg.resources
    fixed_task = defaults.cpus_per_task
    budget = max(total - fixed_task, 0.25) if fixed_task else MODEL_CPU_SHARE * total
    auto = [
        s for s in stages if not (defaults.for_stage(s.name).cpus or defaults.cpus_per_model_actor)
    ]
    plan: dict[str, dict[str, Any]] = {}
    for stage in stages:
        own = defaults.for_stage(stage.name)
        gpus = own.gpus or defaults.gpus_per_model_actor
        cpus = own.cpus or defaults.cpus_per_model_actor
        if own.actors or defaults.model_actors:
            size = own.actors or defaults.model_actors
        elif gpus > 0:
            size = max(1, int(cluster.get("GPU", 0) // gpus))
        else:
            size = max(1, int(budget / (max(len(auto), 1) * (cpus or 1.0))))
        if not cpus:
            cpus = min(1.0, budget / (max(len(auto), 1) * size))
        plan[stage.name] = {
            "size": size,
            "num_cpus": cpus,
            "num_gpus": gpus or None,
            "batch_size": own.batch_size or defaults.model_batch_size,
        }
    if not fixed_task:
        reserved = sum(p["size"] * p["num_cpus"] for p in plan.values())
        slots = max(1, math.floor(total))
        cfg = copy.deepcopy(cfg)
        cfg.resources.cpus_per_task = max(0.25, min(1.0, (total - reserved) / slots))
    return cfg, plan


def _task_args(cfg: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"num_cpus": cfg.resources.cpus_per_task}
    if cfg.resources.memory_per_task_mb:
        args["memory"] = cfg.resources.memory_per_task_mb * 1024 * 1024
    return args


def stage_dataset(
    ds: Any, cfg: Any, actor_stages: list[type[Stage]], plan: dict[str, dict[str, Any]]
) -> Any:
    """Ray Data: flow blocks through every actor stage (`plan` from `plan_resources`); the
    last one drops the frames."""
    import ray.data

    for position, stage in enumerate(actor_stages):
        res = plan[stage.name]
        ds = ds.map_batches(
            StageActor,
            fn_constructor_args=(stage, cfg, position == len(actor_stages) - 1),
            batch_size=res["batch_size"],
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=res["size"], max_size=res["size"]),
            num_cpus=res["num_cpus"],
            num_gpus=res["num_gpus"],
        )
    return ds


# ------------------------------------------------------------------------------------------
# The driver: finished videos -> commits
# ------------------------------------------------------------------------------------------


@dataclass
class CurateSummary:
    videos_done: int = 0
    videos_quarantined: int = 0
    videos_skipped: int = 0  # already done, or out of attempts
    clips: int = 0
    clip_errors: int = 0
    video_seconds: float = 0.0
    wall_seconds: float = 0.0
    commits: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.video_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["video_seconds_per_wall_second"] = round(self.throughput, 3)
        return out

    def render(self) -> str:
        lines = [
            f"videos done:        {self.videos_done}",
            f"videos quarantined: {self.videos_quarantined}",
            f"videos skipped:     {self.videos_skipped} (already done or out of attempts)",
            f"clips written:      {self.clips}",
            f"clip stage errors:  {self.clip_errors}",
            f"video seconds:      {self.video_seconds:.1f}",
            f"wall seconds:       {self.wall_seconds:.1f}",
            f"video-s per wall-s: {self.throughput:.2f}",
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


@dataclass
class _Video:
    clips: list[pa.Table] = field(default_factory=list)
    received: int = 0
    end: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.end is not None and self.received >= self.end["num_clips"]


def write_dsg_claims(db: st.Database, clips: pa.Table) -> None:
    """Move the claims carried by the `dsg` stage into the `dsg_claims` table (replacing any
    earlier claims of the same clips)."""
    if DSG_CLAIMS_JSON not in clips.column_names:
        return
    rows, clip_ids = [], []
    for row in clips.select(["clip_id", "video_id", DSG_CLAIMS_JSON]).to_pylist():
        if row[DSG_CLAIMS_JSON] is None:
            continue
        clip_ids.append(row["clip_id"])
        rows += [
            {**claim, "video_id": row["video_id"]} for claim in json.loads(row[DSG_CLAIMS_JSON])
        ]
    for where in in_chunks("clip_id", clip_ids):
        db.delete(st.DSG_CLAIMS, where)
    if rows:
        schema = pa.schema([*DSGChecker.claims_schema, pa.field("video_id", pa.string())])
        db.write(st.DSG_CLAIMS, pa.Table.from_pylist(rows, schema))


def clip_failures(clips: pa.Table) -> list[qu.Failure]:
    """The errors recorded on clip rows, one Failure per (clip, stage)."""
    failures = []
    for row in clips.select(["uri", "video_id", "clip_id", ERRORS]).to_pylist():
        for stage, kind, message in json.loads(row[ERRORS] or "[]"):
            failures.append(
                qu.Failure(row["uri"], row["video_id"], row["clip_id"], stage, kind, message)
            )
    return failures


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
        **_task_args(cfg),
    )
    ds = stage_dataset(ds, cfg, actor_stages, plan)
    committer = Committer(db, cfg, schema, attempts, summary, len(todo), show_progress)
    # No prefetching: Ray Data's prefetcher waits until its window of blocks is complete, so
    # one slow video would hold back the finished ones behind it (measured: a block done at
    # 5.8 s arrived at 12.5 s, with the slow one).
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        committer.add(block)
    committer.close()


def run_table_stages(db: st.Database, cfg: Any, stages: list[type[Stage]]) -> None:
    """Whole-table stages (dedup) over the clips table, after every video is written."""
    for stage_cls in stages:
        if stage_cls.runs_on == "table" and db.has_table(st.CLIPS):
            stage = stage_cls(cfg)
            stage.setup()
            stage.run_table(db)
            stage.teardown()
