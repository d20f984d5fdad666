"""Scores added to an existing database without re-splitting anything.

`stiv curate --db DB --stages aesthetic` (no INPUT) finds the clips that lack the stage's
columns, decodes only their sampled frames (one pass per video), runs the stage and merges the
new columns into the existing rows by `clip_id` (Lance schema evolution, then a partial
`merge_insert`); no other column and no row is rewritten by hand. `dedup` runs over the whole
clips table after every curation or backfill that lists it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa

from data_engine import store as st
from data_engine.config import MODEL_STAGES, CurateConfig

# The column whose null marks a clip as not yet scored by a stage.
MARKER_COLUMN = {
    "motion": "motion_score",
    "clarity": "clarity_score",
    "ocr": "ocr_text_area",
    "aesthetic": "aesthetic_score",
    "embedding": "clip_embedding",
    "category": "category",
    "caption": "caption",
    "dsg": "dsg_status",
}
_INFO_FIELDS = (
    "video_id", "uri", "duration_s", "fps", "num_frames", "width", "height", "rotation_deg",
    "orientation", "codec", "bit_rate", "has_audio",
)  # fmt: skip


def _todo_filter(schema: pa.Schema, stages: list[str]) -> str | None:
    """Clips missing any of the stages' marker columns (None = every clip)."""
    clauses = []
    for stage in stages:
        column = MARKER_COLUMN[stage]
        if column not in schema.names:
            return None
        clauses.append(f"{column} IS NULL")
    return " OR ".join(clauses)


def _video_rows(db: st.Database, clips: pa.Table, with_captions: bool) -> list[dict[str, Any]]:
    """One row per video with its VideoInfo and the clip ranges to sample (as the pipeline's
    probe_and_split would have produced)."""
    video_ids = sorted(set(clips.column("video_id").to_pylist()))
    from data_engine.pipeline import _sql_list

    infos: dict[str, dict[str, Any]] = {}
    for first in range(0, len(video_ids), 500):
        where = f"video_id IN ({_sql_list(video_ids[first : first + 500])})"
        for row in db.query(st.VIDEOS, where, list(_INFO_FIELDS)).to_pylist():
            infos[row["video_id"]] = row
    by_video: dict[str, list[dict[str, Any]]] = {}
    for clip in clips.to_pylist():
        by_video.setdefault(clip["video_id"], []).append(clip)
    rows = []
    for video_id, video_clips in by_video.items():
        video_clips.sort(key=lambda c: c["start_frame"])
        rows.append(
            {
                "uri": infos[video_id]["uri"],
                "video_id": video_id,
                "info": json.dumps(infos[video_id]),
                "clip_starts": [c["start_frame"] for c in video_clips],
                "clip_ends": [c["end_frame"] for c in video_clips],
                "clip_captions": [c.get("caption") for c in video_clips] if with_captions else [],
                "error_stage": "",
                "error_type": "",
                "error_message": "",
            }
        )
    return rows


def run_backfill(
    db: st.Database, cfg: CurateConfig, address: str | None, summary: Any, started: float
) -> Any:
    """Run the listed scoring stages on existing clips that lack them; merge the columns."""
    import ray

    from data_engine.pipeline import (
        _clips_schema,
        _connect,
        _drop_frames,
        _previous_state,
        clip_dataset,
        collect_errors,
        write_dsg_claims,
    )

    if not db.has_table(st.CLIPS):
        raise st.StoreError(
            f"--stages without INPUT backfills existing clips, but {db.uri} has none"
        )
    stages = [s for s in cfg.stages if s in MARKER_COLUMN]
    if stages:
        schema = _clips_schema(db, cfg, stages)  # adds the new columns (null) to the table
        if "dsg" in stages and "caption" not in schema.names:
            raise st.StoreError("--stages dsg: the clips have no captions (run --stages caption)")
        where = _todo_filter(db.table(st.CLIPS).schema, stages)
        columns = ["clip_id", "video_id", "start_frame", "end_frame"]
        if "dsg" in stages and "caption" not in stages:
            columns.append("caption")
        todo = db.table(st.CLIPS).to_table(columns=columns, filter=where)
        if todo.num_rows:
            _connect(address)
            _, attempts = _previous_state(db)
            videos = _video_rows(db, todo, with_captions="caption" in columns)
            ds = ray.data.from_items(videos, override_num_blocks=len(videos))
            scored = clip_dataset(ds, cfg, stages).map_batches(_drop_frames, batch_format="pyarrow")
            scored = scored.materialize()
            new_columns = ["clip_id"] + [
                f.name
                for f in schema
                if f.name in scored.schema().names and f.name not in todo.column_names
                and f.name not in ("video_id", "uri") and not f.name.startswith("_")
                and f.name not in _CORE
            ]  # fmt: skip
            # In a backfill every error (decoding included) is a clip error: rows stay as they are.
            quarantine, _ = collect_errors(scored, attempts, video_stages=())
            if quarantine:
                from data_engine.pipeline import QUARANTINE_SCHEMA

                table = pa.Table.from_pylist(quarantine, QUARANTINE_SCHEMA)
                db.upsert(st.QUARANTINE, table, "quarantine_id")
            updates = pa.concat_tables(
                [
                    pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b
                    for b in scored.select_columns(new_columns).iter_batches(batch_format="pyarrow")
                ]
            )
            target = pa.schema([schema.field(c) for c in new_columns])
            updates = pa.table(
                [updates.column(c).cast(target.field(c).type) for c in new_columns], target
            )
            db.table(st.CLIPS).merge_insert("clip_id").when_matched_update_all().execute(updates)
            if "dsg" in stages:
                write_dsg_claims(db, scored)
            summary.clips = todo.num_rows
            summary.clip_errors = len(quarantine)
    if "dedup" in cfg.stages:
        run_dedup(db, cfg)
    summary.wall_seconds = time.monotonic() - started
    return summary


_CORE = {
    "start_frame", "end_frame", "start_s", "end_s", "duration_s", "fps", "width", "height",
    "orientation", "sampling_provenance",
}  # fmt: skip


def run_dedup(db: st.Database, cfg: CurateConfig) -> int:
    """Set `dup_of` on every clip (null when kept). Returns the number of duplicates."""
    from data_engine.stages.dedup import find_duplicates

    table = db.table(st.CLIPS)
    if "clip_embedding" not in table.schema.names:
        raise st.StoreError(
            "--stages dedup: the clips have no clip_embedding (run the embedding stage)"
        )
    duplicates = find_duplicates(table, cfg.dedup.max_cosine_distance, cfg=cfg.dedup)
    ids = table.to_table(columns=["clip_id"]).column("clip_id").to_pylist()
    updates = pa.table(
        {
            "clip_id": pa.array(ids, pa.string()),
            "dup_of": pa.array([duplicates.get(i) for i in ids], pa.string()),
        }
    )
    if "dup_of" not in table.schema.names:
        table.add_columns(pa.schema([pa.field("dup_of", pa.string())]))
    db.table(st.CLIPS).merge_insert("clip_id").when_matched_update_all().execute(updates)
    return len(duplicates)


__all__ = ["MODEL_STAGES", "run_backfill", "run_dedup"]
