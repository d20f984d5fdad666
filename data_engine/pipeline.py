"""`stiv curate`: raw videos -> clips with scores in Lance, as Ray Data pipelines.

Per commit group of videos (`videos_per_commit`):

    uris --map(probe_and_split)-->  video rows (+ clip ranges)          [tasks, 1 per video]
         --map_batches(sample_clips)--> clip rows + shared sampled frames [tasks, streamed]
         --map_batches(ScorerActor) x model stage --> score columns      [actor pools]
         --map_batches(finish_clips)--> final clip columns, errors split off
         --lance_ray.write_lance--> clips;  then videos (status=done) and quarantine upserts

Exactly-once without transactions across tables: a video is marked `done` only after all its
clip rows are committed; a rerun first deletes clip rows of videos that are not `done`
(left by a killed job), then redoes those videos. Clip ids are deterministic, so the result is
the same rows an uninterrupted run writes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data.expressions import col

from data_engine import store as st
from data_engine.cheap_scores import clarity_score, motion_score
from data_engine.config import MODEL_STAGES, CurateConfig
from data_engine.frames import ClipFrames, pack_frames, unpack_frames
from data_engine.inputs import expand_inputs
from data_engine.split import detect_scenes
from data_engine.video import (
    VideoError,
    VideoInfo,
    clip_id_for,
    iter_clip_frames,
    probe,
    video_id_for,
)

log = logging.getLogger(__name__)

VIDEO_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("uri", pa.string()),
        ("status", pa.string()),  # "done" | "failed"
        ("duration_s", pa.float64()),
        ("fps", pa.float64()),
        ("num_frames", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("rotation_deg", pa.int64()),
        ("orientation", pa.string()),
        ("codec", pa.string()),
        ("bit_rate", pa.int64()),
        ("has_audio", pa.bool_()),
        ("num_clips", pa.int64()),
        ("updated_at", pa.float64()),
    ]
)

CLIP_CORE_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("video_id", pa.string()),
        ("uri", pa.string()),
        ("start_frame", pa.int64()),
        ("end_frame", pa.int64()),  # exclusive
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("duration_s", pa.float64()),
        ("fps", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("orientation", pa.string()),
        ("sampling_provenance", pa.string()),
    ]
)
CHEAP_SCORE_SCHEMA = {
    # Scores are float32: half the bytes a filter scans, and ample precision for a score.
    "motion": pa.schema([("motion_score", pa.float32())]),
    "clarity": pa.schema([("clarity_score", pa.float32())]),
}

QUARANTINE_SCHEMA = pa.schema(
    [
        ("quarantine_id", pa.string()),  # video_id, or video_id/clip_id/stage for clip failures
        ("uri", pa.string()),
        ("video_id", pa.string()),
        ("clip_id", pa.string()),  # null when the whole video failed
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("attempts", pa.int64()),
        ("updated_at", pa.float64()),
    ]
)

# Transient columns that travel between stages and never reach Lance.
_FRAMES, _SHAPE, _TIMES, _ERRORS = "_frames", "_frames_shape", "_times_s", "_errors"


# ------------------------------------------------------------------------------------------
# Per-video and per-clip compute (plain functions, run in Ray tasks)
# ------------------------------------------------------------------------------------------


def probe_and_split(row: dict[str, Any], cfg: CurateConfig) -> dict[str, Any]:
    """uri -> one video row with its clip ranges, or a failure row (never raises)."""
    uri = row["uri"]
    out: dict[str, Any] = {
        "uri": uri,
        "video_id": video_id_for(uri),
        "info": "",
        "clip_starts": [],
        "clip_ends": [],
        "error_stage": "",
        "error_type": "",
        "error_message": "",
    }
    try:
        info = probe(uri, cfg.storage_options or None, timeout_s=cfg.probe_timeout_s)
        deadline = time.monotonic() + cfg.split.timeout_s
        clips = detect_scenes(uri, info, cfg.split, cfg.storage_options or None, deadline=deadline)
        out["info"] = json.dumps(asdict(info))
        out["clip_starts"] = [int(s) for s, _ in clips]
        out["clip_ends"] = [int(e) for _, e in clips]
    except VideoError as err:
        out.update(error_stage=err.stage, error_type=err.error_type, error_message=err.message)
    except Exception as err:  # an unexpected decoder failure is still this video's failure
        out.update(error_stage="split", error_type=type(err).__name__, error_message=str(err))
    return out


def _sampling_provenance(cfg: CurateConfig) -> str:
    return json.dumps(asdict(cfg.sampling), sort_keys=True)


def _clip_row(info: VideoInfo, start: int, end: int, provenance: str) -> dict[str, Any]:
    fps = info.fps or 1.0
    return {
        "clip_id": clip_id_for(info.video_id, start, end),
        "video_id": info.video_id,
        "uri": info.uri,
        "start_frame": start,
        "end_frame": end,
        "start_s": start / fps,
        "end_s": end / fps,
        "duration_s": (end - start) / fps,
        "fps": info.fps,
        "width": info.width,
        "height": info.height,
        "orientation": info.orientation,
        "sampling_provenance": provenance,
    }


def sample_clips(
    videos: pa.Table, cfg: CurateConfig, stages: list[str], clips_per_batch: int = 8
) -> Iterator[pa.Table]:
    """Video rows -> clip rows carrying their sampled frames and cheap scores.

    Frames are decoded once per video and shared by every scorer downstream. Output streams
    in batches of `clips_per_batch` clips as decoding advances, so a long film never holds all
    its frames at once. A sampling failure turns the video's remaining clips into error rows
    (the video is then not `done` and none of its clips are written).
    """
    provenance = _sampling_provenance(cfg)
    for video in videos.to_pylist():
        info = VideoInfo(**json.loads(video["info"]))
        ranges = list(zip(video["clip_starts"], video["clip_ends"]))
        rows = [_clip_row(info, s, e, provenance) for s, e in ranges]
        for row, caption in zip(rows, video.get("clip_captions") or []):
            row["caption"] = caption  # backfilling `dsg` on clips captioned earlier
        if "caption" in stages and cfg.caption.backend == "sidecar":
            sidecar = sidecar_caption(info.uri, cfg)
            for row in rows:
                row.update(sidecar)
        pending: list[dict[str, Any]] = []
        finished: set[int] = set()
        try:
            deadline = time.monotonic() + cfg.sampling.timeout_s
            for index, clip in iter_clip_frames(
                info.uri, info, ranges, cfg.sampling, cfg.storage_options or None, deadline
            ):
                row = rows[index]
                if "motion" in stages:
                    row["motion_score"] = motion_score(clip)
                if "clarity" in stages:
                    row["clarity_score"] = clarity_score(clip)
                row[_FRAMES], row[_SHAPE] = pack_frames(clip.frames)
                row[_TIMES] = clip.times_s.astype(np.float64).tolist()
                row[_ERRORS] = "[]"
                pending.append(row)
                finished.add(index)
                if len(pending) >= clips_per_batch:
                    yield _rows_table(pending, stages)
                    pending = []
        except Exception as err:  # VideoError, or a scorer's ValueError on unusable frames
            stage = getattr(err, "stage", "sample")
            kind = getattr(err, "error_type", type(err).__name__)
            message = getattr(err, "message", str(err))
            for index, row in enumerate(rows):
                if index not in finished:
                    row.update(_empty_frames())
                    row[_ERRORS] = json.dumps([["sample", kind, f"{stage}: {message}"]])
                    pending.append(row)
        if pending:
            yield _rows_table(pending, stages)


def sidecar_caption(uri: str, cfg: CurateConfig) -> dict[str, Any]:
    """Caption columns from `<video stem>.txt` beside the video (datasets that ship captions).
    A missing or empty file leaves the caption null, which `prepare` skips."""
    from data_engine.video import open_input

    stem, _, _ = uri.rpartition(".")
    text = None
    try:
        source = open_input(stem + ".txt", cfg.storage_options or None)
        if isinstance(source, str):
            with open(source, encoding="utf-8") as handle:
                text = handle.read().strip() or None
        else:
            with source:
                text = source.read().decode("utf-8").strip() or None
    except (OSError, VideoError):
        text = None
    provenance = json.dumps({"backend": "sidecar", "file": stem + ".txt"})
    return {
        "caption": text,
        "caption_backend": "sidecar",
        "caption_model": "",
        "caption_prompt_hash": "",
        "caption_time_s": 0.0,
        "caption_provenance": provenance,
    }


def _empty_frames() -> dict[str, Any]:
    return {_FRAMES: b"", _SHAPE: [0, 0, 0, 3], _TIMES: []}


def _rows_table(rows: list[dict[str, Any]], stages: list[str]) -> pa.Table:
    fields = list(CLIP_CORE_SCHEMA)
    for name, schema in CHEAP_SCORE_SCHEMA.items():
        if name in stages:
            fields.extend(schema)
    if any("caption_provenance" in r for r in rows):
        from data_engine.captioning.caption import CaptionStage

        fields.extend(CaptionStage.output_schema)
    elif any("caption" in r for r in rows):
        fields.append(pa.field("caption", pa.string()))
    fields += [
        pa.field(_FRAMES, pa.binary()),
        pa.field(_SHAPE, pa.list_(pa.int64())),
        pa.field(_TIMES, pa.list_(pa.float64())),
        pa.field(_ERRORS, pa.string()),
    ]
    schema = pa.schema(fields)
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema)


def clip_frames_from_row(row: dict[str, Any]) -> ClipFrames | None:
    """The shared frames of one clip row (None when sampling failed for it)."""
    if not row[_FRAMES]:
        return None
    frames = unpack_frames(row[_FRAMES], row[_SHAPE])
    times = np.asarray(row[_TIMES], dtype=np.float64)
    empty = np.zeros((0, *frames.shape[1:]), dtype=np.uint8)
    return ClipFrames(frames, times, empty, np.zeros(0))


# ------------------------------------------------------------------------------------------
# Model stages (actor pools)
# ------------------------------------------------------------------------------------------


def build_scorer(stage: str, cfg: CurateConfig) -> Any:
    """Instantiate the scorer for a model stage (loads its model: call once per actor)."""
    from data_engine.stages.registry import build

    return build(stage, cfg)


def check_stage_ready(stage: str, cfg: CurateConfig) -> None:
    """Fail before any work starts when a stage's weights are missing (names the config key)."""
    from data_engine.stages.registry import check_ready

    check_ready(stage, cfg)


def stage_output_schema(stage: str, cfg: CurateConfig) -> pa.Schema:
    from data_engine.stages.registry import output_schema

    return output_schema(stage, cfg)


class ScorerActor:
    """Loads one scorer once; scores batches of clip rows from their shared frames."""

    def __init__(self, stage: str, cfg: CurateConfig) -> None:
        self.stage = stage
        self.schema = stage_output_schema(stage, cfg)
        self.scorer = build_scorer(stage, cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [i for i, r in enumerate(rows) if r[_FRAMES]]
        results: list[dict[str, Any]] = [{} for _ in rows]
        if todo:
            clips = [clip_frames_from_row(rows[i]) for i in todo]
            try:
                if self.stage == "dsg":
                    scored = self.scorer.score_rows(clips, [rows[i] for i in todo])
                else:
                    scored = self.scorer.score_clips(clips)
            except Exception as err:  # the batch failed as a whole: every clip records it
                scored = [{"error": f"{type(err).__name__}: {err}"} for _ in todo]
            for i, result in zip(todo, scored):
                results[i] = result
        for row, result in zip(rows, results):
            if "error" in result:
                errors = json.loads(row[_ERRORS])
                errors.append([self.stage, "stage_error", str(result["error"])])
                row[_ERRORS] = json.dumps(errors)
        columns = {name: batch.column(name) for name in batch.column_names}
        for f in self.schema:
            values = [None if "error" in r else r.get(f.name) for r in results]
            columns[f.name] = pa.array(values, type=f.type)
        columns[_ERRORS] = pa.array([r[_ERRORS] for r in rows], pa.string())
        return pa.table(columns)


# ------------------------------------------------------------------------------------------
# Driver
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


def model_stage_resources(cfg: CurateConfig, num_stages: int) -> tuple[int, float]:
    """(actors per model stage, CPUs per actor), derived from the cluster when not configured.

    Every model stage's pool starts at full size (min == max), so all pools together must fit
    beside at least one CPU for decoding tasks, or the job waits for ever (the 2-core trap in
    ENV-NOTES.md, in its Ray Data form).
    """
    import ray

    resources = ray.cluster_resources()
    spare_cpus = max(resources.get("CPU", 1.0) - cfg.resources.cpus_per_task, 0.25)
    cpus = cfg.resources.cpus_per_model_actor
    if cfg.resources.model_actors:
        size = cfg.resources.model_actors
    elif cfg.resources.gpus_per_model_actor > 0:
        size = max(1, int(resources.get("GPU", 0) // cfg.resources.gpus_per_model_actor))
    else:
        size = max(1, int(spare_cpus // (num_stages * (cpus or 1.0))))
    if not cpus:
        cpus = min(1.0, spare_cpus / (num_stages * size))
    return size, cpus


def _task_args(cfg: CurateConfig) -> dict[str, Any]:
    args: dict[str, Any] = {"num_cpus": cfg.resources.cpus_per_task}
    if cfg.resources.memory_per_task_mb:
        args["memory"] = cfg.resources.memory_per_task_mb * 1024 * 1024
    return args


def clip_dataset(videos, cfg: CurateConfig, stages: list[str]):
    """Ray Data: done video rows -> scored clip rows (transient frame columns still attached)."""
    model_stages = [s for s in MODEL_STAGES if s in stages]
    if cfg.caption.backend == "sidecar" and "caption" in model_stages:
        model_stages.remove("caption")  # filled while sampling (see `sidecar_caption`)
    ds = videos.map_batches(
        sample_clips,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"cfg": cfg, "stages": stages},
        **_task_args(cfg),
    )
    pool, cpus = model_stage_resources(cfg, len(model_stages)) if model_stages else (0, 0.0)
    for stage in model_stages:
        ds = ds.map_batches(
            ScorerActor,
            fn_constructor_args=(stage, cfg),
            batch_size=cfg.resources.model_batch_size,
            batch_format="pyarrow",
            compute=_actor_pool(pool),
            num_cpus=cpus,
            num_gpus=cfg.resources.gpus_per_model_actor or None,
        )
    return ds


def _actor_pool(size: int):
    import ray.data

    return ray.data.ActorPoolStrategy(min_size=size, max_size=size)


def _drop_frames(batch: pa.Table) -> pa.Table:
    return batch.drop_columns([c for c in (_FRAMES, _SHAPE, _TIMES) if c in batch.column_names])


def _conform(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast a batch to the clips table's schema (missing columns as nulls, extras dropped)."""
    columns = []
    for f in schema:
        if f.name in batch.column_names:
            columns.append(batch.column(f.name).cast(f.type))
        else:
            columns.append(pa.nulls(batch.num_rows, f.type))
    return pa.table(columns, schema=schema)


def _quarantine_row(
    uri: str,
    video_id: str,
    clip_id: str | None,
    stage: str,
    kind: str,
    message: str,
    attempts: dict[str, int],
) -> dict[str, Any]:
    key = video_id if clip_id is None else f"{video_id}/{clip_id}/{stage}"
    return {
        "quarantine_id": key,
        "uri": uri,
        "video_id": video_id,
        "clip_id": clip_id,
        "stage": stage,
        "error_type": kind,
        "message": message[:2000],
        "attempts": attempts.get(key, 0) + 1,
        "updated_at": time.time(),
    }


def collect_errors(
    clips, attempts: dict[str, int], video_stages: tuple[str, ...] = ("sample", "split", "probe")
) -> tuple[list[dict[str, Any]], dict[str, tuple[str, str, str]]]:
    """Errors carried by scored clip rows -> (quarantine rows for clip-stage errors, first
    failure per video for `video_stages`, whose videos are then not done)."""
    quarantine: list[dict[str, Any]] = []
    failed: dict[str, tuple[str, str, str]] = {}
    for row in clips.filter(expr=col(_ERRORS) != "[]").take_all():
        for stage, kind, message in json.loads(row[_ERRORS]):
            if stage in video_stages:
                failed.setdefault(row["video_id"], (stage, kind, message))
                continue
            quarantine.append(
                _quarantine_row(
                    row["uri"], row["video_id"], row["clip_id"], stage, kind, message, attempts
                )
            )
    return quarantine, failed


def _clips_schema(db: st.Database, cfg: CurateConfig, stages: list[str]) -> pa.Schema:
    """The clips table's schema after this run: what exists plus this run's new columns.
    New columns are added to an existing table first (null for old rows: schema evolution)."""
    fields = list(CLIP_CORE_SCHEMA)
    for name, schema in CHEAP_SCORE_SCHEMA.items():
        if name in stages:
            fields.extend(schema)
    for stage in MODEL_STAGES:
        if stage in stages:
            fields.extend(f for f in stage_output_schema(stage, cfg) if not f.name.startswith("_"))
    wanted = pa.schema(fields)
    if not db.has_table(st.CLIPS):
        return wanted
    table = db.table(st.CLIPS)
    missing = [f for f in wanted if f.name not in table.schema.names]
    if missing:
        table.add_columns(pa.schema(missing))
    return db.table(st.CLIPS).schema


def write_dsg_claims(db: st.Database, clips) -> None:
    """Move the claims carried by the `dsg` stage into the `dsg_claims` table (replacing any
    earlier claims of the same clips)."""
    from data_engine.captioning.dsg import DSGStage
    from data_engine.stages.registry import DSG_CLAIMS_JSON

    rows = []
    clip_ids = []
    for row in clips.select_columns(["clip_id", "video_id", DSG_CLAIMS_JSON]).take_all():
        if row[DSG_CLAIMS_JSON] is None:
            continue
        clip_ids.append(row["clip_id"])
        for claim in json.loads(row[DSG_CLAIMS_JSON]):
            rows.append({**claim, "video_id": row["video_id"]})
    schema = pa.schema([*DSGStage.claims_schema, pa.field("video_id", pa.string())])
    for first in range(0, len(clip_ids), 500):
        db.delete(st.DSG_CLAIMS, f"clip_id IN ({_sql_list(clip_ids[first : first + 500])})")
    if rows:
        db.write(st.DSG_CLAIMS, pa.Table.from_pylist(rows, schema))


def _connect(address: str | None) -> None:
    import os

    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # "local": always an embedded Ray. A bare ray.init() would join whatever cluster was
        # started last on this machine (/tmp/ray/ray_current_cluster), or hang on a dead one.
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True


def _previous_state(db: st.Database) -> tuple[dict[str, str], dict[str, int]]:
    """Video statuses and quarantine attempt counts from earlier runs."""
    statuses: dict[str, str] = {}
    attempts: dict[str, int] = {}
    if db.has_table(st.VIDEOS):
        t = db.table(st.VIDEOS).to_table(columns=["video_id", "status"])
        statuses = dict(zip(t.column("video_id").to_pylist(), t.column("status").to_pylist()))
    if db.has_table(st.QUARANTINE):
        t = db.table(st.QUARANTINE).to_table(columns=["quarantine_id", "attempts"])
        attempts = dict(
            zip(t.column("quarantine_id").to_pylist(), t.column("attempts").to_pylist())
        )
    return statuses, attempts


def _sql_list(values: list[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def run_curate(
    inputs: list[str], db_uri: str, cfg: CurateConfig, address: str | None = None
) -> CurateSummary:
    """Curate `inputs` into the database at `db_uri` (resumable; see module docstring)."""
    import lance_ray
    import ray

    started = time.monotonic()
    summary = CurateSummary()
    stages = cfg.stages
    for stage in stages:
        if stage in MODEL_STAGES:
            check_stage_ready(stage, cfg)
    db = st.Database(db_uri, cfg.storage_options or None)
    expanded = expand_inputs(inputs)
    summary.notes.extend(expanded.notes)
    if not inputs:
        from data_engine.backfill import run_backfill

        return run_backfill(db, cfg, address, summary, started)
    statuses, attempts = _previous_state(db)
    todo = []
    for uri in expanded.uris:
        video_id = video_id_for(uri)
        if statuses.get(video_id) == "done" or attempts.get(video_id, 0) >= cfg.max_attempts:
            summary.videos_skipped += 1
        else:
            todo.append(uri)
    if not todo:
        summary.wall_seconds = time.monotonic() - started
        return summary
    _connect(address)
    # Clip rows of videos that are not done were left by a killed run: remove them first.
    if db.has_table(st.CLIPS):
        leftover = [video_id_for(u) for u in todo]
        for first in range(0, len(leftover), 500):
            db.delete(st.CLIPS, f"video_id IN ({_sql_list(leftover[first : first + 500])})")
            db.delete(st.DSG_CLAIMS, f"video_id IN ({_sql_list(leftover[first : first + 500])})")
    schema = _clips_schema(db, cfg, stages)

    for first in range(0, len(todo), cfg.videos_per_commit):
        group = todo[first : first + cfg.videos_per_commit]
        videos = ray.data.from_items([{"uri": u} for u in group], override_num_blocks=len(group))
        videos = videos.map(probe_and_split, fn_kwargs={"cfg": cfg}, **_task_args(cfg))
        videos = videos.materialize()
        video_rows = videos.take_all()
        ok = videos.filter(expr=col("error_stage") == "")
        clips = clip_dataset(ok, cfg, stages).map_batches(_drop_frames, batch_format="pyarrow")
        clips = clips.materialize()
        quarantine, failed = collect_errors(clips, attempts)
        summary.clip_errors += len(quarantine)
        kept = clips
        if failed:
            kept = clips.filter(lambda r, bad=frozenset(failed): r["video_id"] not in bad)
        good = kept.map_batches(_conform, fn_kwargs={"schema": schema}, batch_format="pyarrow")
        num_clips = good.count()
        if num_clips:
            mode = "append" if db.has_table(st.CLIPS) else "create"
            lance_ray.write_lance(
                good,
                db.uri_for(st.CLIPS),
                mode=mode,
                schema=schema,
                storage_options=db.storage_options,
            )
        summary.clips += num_clips
        if "dsg" in stages and num_clips:
            write_dsg_claims(db, kept)

        now = time.time()
        video_table = []
        for row in video_rows:
            if not row["error_stage"] and row["video_id"] in failed:
                row["error_stage"], row["error_type"], row["error_message"] = failed[
                    row["video_id"]
                ]
            info = json.loads(row["info"]) if row["info"] else {}
            done = not row["error_stage"]
            record = {name: info.get(name) for name in VIDEO_SCHEMA.names if name in info}
            record.update(
                video_id=row["video_id"],
                uri=row["uri"],
                status="done" if done else "failed",
                num_clips=len(row["clip_starts"]) if done else 0,
                updated_at=now,
            )
            video_table.append(record)
            if done:
                summary.videos_done += 1
                summary.video_seconds += float(info.get("duration_s") or 0.0)
            else:
                summary.videos_quarantined += 1
                quarantine.append(
                    _quarantine_row(
                        row["uri"],
                        row["video_id"],
                        None,
                        row["error_stage"],
                        row["error_type"],
                        row["error_message"],
                        attempts,
                    )
                )
        # Quarantine first, then video statuses: a video is `done` only once all is committed.
        if quarantine:
            db.upsert(
                st.QUARANTINE, pa.Table.from_pylist(quarantine, QUARANTINE_SCHEMA), "quarantine_id"
            )
        done_ids = [r["video_id"] for r in video_table if r["status"] == "done"]
        if done_ids and db.has_table(st.QUARANTINE):
            # A video that succeeded on retry no longer belongs in quarantine.
            db.delete(st.QUARANTINE, f"clip_id IS NULL AND video_id IN ({_sql_list(done_ids)})")
        db.upsert(st.VIDEOS, pa.Table.from_pylist(video_table, VIDEO_SCHEMA), "video_id")

    for table in (st.VIDEOS, st.CLIPS):
        db.ensure_indexes(table)
    if "dedup" in stages:
        from data_engine.backfill import run_dedup

        run_dedup(db, cfg)
    summary.wall_seconds = time.monotonic() - started
    return summary
