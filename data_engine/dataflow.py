"""The curation dataflow that the fresh pass (`data_engine.pipeline`) and the backfill
(`data_engine.backfill`) share: the run's schemas, the rows in flight between Ray Data operators,
the stages (in decode tasks, in pre-sized actor pools, over the whole table), the resources they
reserve, and what a run reports and commits besides the clips themselves.

Both drivers import this module and neither imports the other at module level, so the two stay
free of an import cycle (docs/architecture.md "Import layers").
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from data_engine import quarantine as qu
from data_engine import store as st
from data_engine.captioning.dsg import DSG_CLAIMS_JSON, DSGChecker
from data_engine.frames import ClipFrames, pack_frames, unpack_frames
from data_engine.scan import ClipResult
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
    in_chunks,
    is_transient,
    join_schemas,
)
from data_engine.stages.base import ClipInput, Stage

log = logging.getLogger(__name__)

VIDEO_END = "_video_end"  # transient: JSON of a video's end row (null on clip rows)


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


# ------------------------------------------------------------------------------------------
# Stages: in decode tasks, in actor pools, over the whole table
# ------------------------------------------------------------------------------------------


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


def run_table_stages(db: st.Database, cfg: Any, stages: list[type[Stage]]) -> None:
    """Whole-table stages (dedup) over the clips table, after every video is written."""
    for stage_cls in stages:
        if stage_cls.runs_on == "table" and db.has_table(st.CLIPS):
            stage = stage_cls(cfg)
            stage.setup()
            stage.run_table(db)
            stage.teardown()


# ------------------------------------------------------------------------------------------
# Resources
# ------------------------------------------------------------------------------------------


MODEL_CPU_SHARE = 0.25  # auto: share of the cluster's CPUs reserved for model actor pools


def plan_resources(cfg: Any, stages: list[type[Stage]]) -> tuple[Any, dict[str, dict[str, Any]]]:
    """(config with `resources.cpus_per_task` resolved, per actor stage: pool size, CPUs and
    GPUs per actor, batch size). `resources.<stage>` wins; then the global `resources.*`; then
    values derived from `ray.cluster_resources()`.

    Every pool starts at full size (min == max), so all pools together must fit beside the
    decode tasks, or the job waits for ever (docs/design-notes.md "The 2-core trap"). When
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


def task_args(cfg: Any) -> dict[str, Any]:
    """Ray resources of one decode task (`resources.cpus_per_task`, the memory hint)."""
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
# What a run reports and commits besides clips
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
