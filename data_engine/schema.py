"""Every curation table's layout, in one place (docs/architecture.md "Storage").

The `videos`, `quarantine` and core `clips` columns are fixed here; each stage owns the clip
columns it adds (`Stage.output_schema`), and `clips_schema` joins the two for a run. Transient
columns (names starting with `_`) travel between pipeline steps and never reach Lance.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

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
        ("sample_frames", pa.list_(pa.int64())),  # frames the scorers saw (null: none sampled)
        ("sample_pair_frames", pa.list_(pa.int64())),  # each one's optical-flow pair frame
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("quarantine_id", pa.string()),  # video_id, or video_id/clip_id/stage for a clip
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

# Transient clip columns: the shared sampled frames and the errors recorded on a clip.
FRAMES = "_frames"  # (K, H, W, 3) uint8 RGB as raw bytes
FRAMES_SHAPE = "_frames_shape"  # [K, H, W, 3]
PAIR_FRAMES = "_pair_frames"  # each sampled frame's optical-flow pair, same shape
PAIR_DT = "_pair_dt_s"  # seconds between each frame and its pair
TIMES = "_times_s"  # presentation time of each sampled frame (s from the video start)
ERRORS = "_errors"  # JSON list of [stage, error_type, message]
TRANSIENT_FIELDS = (
    pa.field(FRAMES, pa.binary()),
    pa.field(FRAMES_SHAPE, pa.list_(pa.int64())),
    pa.field(PAIR_FRAMES, pa.binary()),
    pa.field(PAIR_DT, pa.list_(pa.float64())),
    pa.field(TIMES, pa.list_(pa.float64())),
    pa.field(ERRORS, pa.string()),
)
FRAME_COLUMNS = (FRAMES, FRAMES_SHAPE, PAIR_FRAMES, PAIR_DT, TIMES)


def is_transient(name: str) -> bool:
    return name.startswith("_")


def join_schemas(parts: Iterable[pa.Schema | Iterable[pa.Field]]) -> pa.Schema:
    """Fields of every part in order; a later field with an existing name is skipped."""
    fields: dict[str, pa.Field] = {}
    for part in parts:
        for f in part:
            fields.setdefault(f.name, f)
    return pa.schema(list(fields.values()))


def conform(data: pa.Table, schema: pa.Schema) -> pa.Table:
    """`data` cast to `schema`: columns in its order, missing ones as nulls, extras dropped.
    The one schema cast of the project: Lance appends and merges go through it."""
    columns = []
    for f in schema:
        if f.name in data.column_names:
            columns.append(data.column(f.name).cast(f.type))
        else:
            columns.append(pa.nulls(data.num_rows, f.type))
    return pa.table(columns, schema=schema)


def sql_list(values: Iterable[str]) -> str:
    """`'a', 'b'` for an SQL `IN (...)` list, quotes escaped."""
    return ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)


def in_chunks(column: str, values: list[str], size: int = 500) -> Iterable[str]:
    """`column IN (...)` filters over `values`, at most `size` values each."""
    for first in range(0, len(values), size):
        yield f"{column} IN ({sql_list(values[first : first + size])})"
