"""Scores added to an existing database without re-splitting anything.

`stiv curate --db DB --stages aesthetic` (no INPUT) finds the clips each listed stage must
(re)do (`Stage.todo_filter`: null marker column, or a failed DSG check), skips clips whose
attempts for that stage reached `max_attempts`, decodes only their sampled frames (one pass per
video, exactly the frames recorded in `sample_frames`) and runs the stages through the same
actor pools as curation. The new columns are merged into the existing rows by `clip_id` (Lance
schema evolution, then a partial `merge_insert`), in commits of a bounded number of clips; no
other column and no row is rewritten. Whole-table stages (dedup) run after.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from data_engine import dataflow
from data_engine import quarantine as qu
from data_engine import store as st
from data_engine.scan import ClipResult, run_task_stages, sample_known_clips
from data_engine.schema import (
    CLIP_CORE_SCHEMA,
    VIDEO_SCHEMA,
    conform,
    in_chunks,
    is_transient,
)
from data_engine.stages.base import Stage
from data_engine.video import VideoError, VideoInfo
from stiv_core.ray_connect import connect_ray

MERGE_ROWS = 4096  # clip updates per merge commit (bounded driver memory, steady progress)
_INFO_FIELDS = tuple(f for f in VIDEO_SCHEMA.names if f in VideoInfo.__dataclass_fields__)


def _todo_clips(
    db: st.Database, cfg: Any, stages: list[type[Stage]], attempts: dict[str, int]
) -> tuple[pa.Table, int]:
    """Clips any of `stages` must (re)do, minus those out of attempts for all of them; and how
    many were left out for being out of attempts."""
    clips = db.table(st.CLIPS)
    names = clips.schema.names
    clauses = []
    for stage in stages:
        if stage.marker_column(cfg) not in names:
            clauses = []  # a new column: every clip needs it
            break
        clauses.append(f"({stage.todo_filter(cfg)})")
    where = " OR ".join(clauses) if clauses else None
    reads = {c for s in stages for c in s.reads if c in names}
    columns = [c for c in CLIP_CORE_SCHEMA.names if c in names] + sorted(reads)
    todo = clips.to_table(columns=columns, filter=where)
    keep, skipped = [], 0
    for i, (video_id, clip_id) in enumerate(
        zip(todo.column("video_id").to_pylist(), todo.column("clip_id").to_pylist())
    ):
        keys = [qu.quarantine_key(video_id, clip_id, s.name) for s in stages]
        if all(qu.out_of_attempts(attempts, k, cfg.max_attempts) for k in keys):
            skipped += 1
        else:
            keep.append(i)
    return todo.take(pa.array(keep, pa.int64())), skipped


def _video_items(db: st.Database, todo: pa.Table) -> list[dict[str, Any]]:
    """One item per video: its VideoInfo and the clips to sample (as JSON: Ray-friendly)."""
    video_ids = sorted(set(todo.column("video_id").to_pylist()))
    infos: dict[str, dict[str, Any]] = {}
    for where in in_chunks("video_id", video_ids):
        for row in db.query(st.VIDEOS, where, list(_INFO_FIELDS)).to_pylist():
            infos[row["video_id"]] = row
    by_video: dict[str, list[dict[str, Any]]] = {}
    for clip in todo.to_pylist():
        by_video.setdefault(clip["video_id"], []).append(clip)
    items = []
    for video_id, clips in by_video.items():
        clips.sort(key=lambda c: c["start_frame"])
        items.append({"info": json.dumps(infos[video_id]), "clips": json.dumps(clips)})
    return items


def sample_videos(
    batch: pa.Table,
    cfg: Any,
    task_stages: list[type[Stage]],
    ship_frames: bool,
    schema: pa.Schema,
) -> Iterator[pa.Table]:
    """Ray task: known clips of one video -> flow rows with their frames and task-stage scores.
    A video that no longer decodes records the error on each of its clips."""
    cpus = cfg.resources.cpus_per_task
    stages = dataflow.start_task(cfg, task_stages)
    for info_json, clips_json in zip(
        batch.column("info").to_pylist(), batch.column("clips").to_pylist()
    ):
        info = VideoInfo(**json.loads(info_json))
        clips = json.loads(clips_json)
        rows, done = [], set()
        try:
            for index, frames in sample_known_clips(info, clips, cfg, cpus):
                clip = ClipResult(dict(clips[index]), frames)
                run_task_stages(stages, clip)
                rows.append(dataflow.clip_flow_row(clip, ship_frames))
                done.add(index)
        except (VideoError, ValueError, OSError) as err:
            message = f"{getattr(err, 'stage', 'sample')}: {getattr(err, 'message', err)}"
            kind = getattr(err, "error_type", type(err).__name__)
            for index, clip in enumerate(clips):
                if index not in done:
                    failed = ClipResult(dict(clip), None, [["sample", kind, message]])
                    rows.append(dataflow.clip_flow_row(failed, False))
        yield dataflow.flow_table(rows, schema)


def _merge(db: st.Database, updates: list[pa.Table], target: pa.Schema) -> None:
    table = pa.concat_tables(updates)
    db.table(st.CLIPS).merge_insert("clip_id").when_matched_update_all().execute(
        conform(table, target)
    )


def run_backfill(
    db: st.Database,
    cfg: Any,
    address: str | None,
    summary: dataflow.CurateSummary,
    started: float,
    verbose: bool = False,
    show_progress: bool = True,
) -> dataflow.CurateSummary:
    """Run the listed scoring stages on existing clips that lack them; merge the columns."""
    if not db.has_table(st.CLIPS):
        raise st.StoreError(
            f"--stages without INPUT backfills existing clips, but {db.uri} has none"
        )
    selected = cfg.selected()
    video_stages = [s.name for s in selected if s.runs_on == "video"]
    stages = [s for s in selected if s.runs_on in ("task", "actor")]
    if video_stages:
        why = (
            f"--stages {','.join(video_stages)}: probe and split run only on new videos (give "
            "INPUT videos); existing clips keep their ranges"
        )
        if not stages and not any(s.runs_on == "table" for s in selected):
            raise st.StoreError(why)
        summary.notes.append(why)
    if stages:
        schema = dataflow.clips_schema(db, cfg, stages)  # adds the new columns (null) to the table
        dsg = any("caption" in s.reads for s in stages)
        if dsg and "caption" not in schema.names and not any(s.name == "caption" for s in stages):
            raise st.StoreError("--stages dsg: the clips have no captions (run --stages caption)")
        attempts = qu.load_attempts(db)
        todo, out_of_attempts = _todo_clips(db, cfg, stages, attempts)
        if out_of_attempts:
            summary.notes.append(
                f"{out_of_attempts} clips skipped: out of attempts (max_attempts="
                f"{cfg.max_attempts}) for every listed stage"
            )
        if todo.num_rows:
            connect_ray(address, verbose)
            _backfill(db, cfg, stages, schema, todo, attempts, summary)
    dataflow.run_table_stages(db, cfg, selected)
    db.ensure_indexes(st.CLIPS)
    summary.wall_seconds = time.monotonic() - started
    return summary


def _backfill(
    db: st.Database,
    cfg: Any,
    stages: list[type[Stage]],
    schema: pa.Schema,
    todo: pa.Table,
    attempts: dict[str, int],
    summary: dataflow.CurateSummary,
) -> None:
    import ray.data

    task_stages = [s for s in stages if s.runs_on == "task"]
    actor_stages = [s for s in stages if s.runs_on == "actor"]
    ship_frames = any("frames" in s.reads for s in actor_stages)
    flow = dataflow.flow_schema(cfg, stages)
    cfg, plan = dataflow.plan_resources(cfg, actor_stages)
    # Columns a stage reads from the table (dsg's caption) travel with the clip rows.
    carried = [f for f in schema if f.name in todo.column_names and f.name not in flow.names]
    flow = pa.schema([*flow, *carried])
    items = _video_items(db, todo)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        sample_videos,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "cfg": cfg,
            "task_stages": task_stages,
            "ship_frames": ship_frames,
            "schema": flow,
        },
        num_cpus=cfg.resources.cpus_per_task,
    )
    ds = dataflow.stage_dataset(ds, cfg, actor_stages, plan)
    produced = {f.name for s in stages for f in s.output_schema(cfg)}
    target = pa.schema(
        [schema.field("clip_id")]
        + [f for f in schema if f.name in produced and not is_transient(f.name)]
    )
    pending: list[pa.Table] = []
    pending_rows = 0
    failures: list[qu.Failure] = []
    succeeded: list[str] = []  # earlier failures that now scored: they leave quarantine
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        block = block.filter(pa.compute.is_null(block.column(dataflow.VIDEO_END)))
        if not block.num_rows:
            continue
        block_failures = dataflow.clip_failures(block)
        failures += block_failures
        failed = {f.key for f in block_failures}
        succeeded += [
            key
            for clip_id, video_id in zip(
                block["clip_id"].to_pylist(), block["video_id"].to_pylist()
            )
            for key in (qu.quarantine_key(video_id, clip_id, s.name) for s in stages)
            if key in attempts and key not in failed
        ]
        if any(s.name == "dsg" for s in stages):
            dataflow.write_dsg_claims(db, block)
        pending.append(block)
        pending_rows += block.num_rows
        summary.clips += block.num_rows
        if pending_rows >= MERGE_ROWS:
            _merge(db, pending, target)
            pending, pending_rows = [], 0
    if pending:
        _merge(db, pending, target)
    qu.record(db, failures, attempts)
    qu.clear(db, succeeded)
    summary.clip_errors = len(failures)
