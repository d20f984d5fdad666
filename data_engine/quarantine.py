"""The quarantine table: what failed, where, why, and how often (docs/architecture.md).

One row per failing item, upserted by `quarantine_id` so a rerun updates the row instead of
appending a new one; `attempts` counts the tries, and callers stop retrying an item once it
reaches `max_attempts`. Keys: a whole video is `video_id`; one clip's failure in one stage is
`video_id/clip_id/stage` (curation scorers, `prepare`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from data_engine import store as st
from data_engine.schema import QUARANTINE_SCHEMA, in_chunks

MAX_MESSAGE_CHARS = 2000


def quarantine_key(video_id: str, clip_id: str | None = None, stage: str | None = None) -> str:
    """The row key: `video_id` for a whole video, `video_id/clip_id/stage` for one clip."""
    if clip_id is None:
        return video_id
    return f"{video_id}/{clip_id}/{stage}"


@dataclass(frozen=True)
class Failure:
    """One failed item, before it is counted and written."""

    uri: str
    video_id: str
    clip_id: str | None
    stage: str
    error_type: str
    message: str

    @property
    def key(self) -> str:
        return quarantine_key(self.video_id, self.clip_id, self.stage)


def load_attempts(db: st.Database) -> dict[str, int]:
    """Attempts so far per quarantine key (empty when nothing ever failed)."""
    if not db.has_table(st.QUARANTINE):
        return {}
    table = db.table(st.QUARANTINE).to_table(columns=["quarantine_id", "attempts"])
    return dict(
        zip(table.column("quarantine_id").to_pylist(), table.column("attempts").to_pylist())
    )


def out_of_attempts(attempts: dict[str, int], key: str, max_attempts: int) -> bool:
    return attempts.get(key, 0) >= max_attempts


def record(db: st.Database, failures: list[Failure], attempts: dict[str, int]) -> None:
    """Upsert one row per failure with its attempt count (earlier attempts + 1). `attempts` is
    updated in place, so one run never counts an item twice by reloading."""
    if not failures:
        return
    now = time.time()
    rows: dict[str, dict[str, Any]] = {}
    for failure in failures:
        if failure.key in rows:
            continue  # one attempt per item per run, whatever number of errors it had
        attempts[failure.key] = attempts.get(failure.key, 0) + 1
        rows[failure.key] = {
            "quarantine_id": failure.key,
            "uri": failure.uri,
            "video_id": failure.video_id,
            "clip_id": failure.clip_id,
            "stage": failure.stage,
            "error_type": failure.error_type,
            "message": failure.message[:MAX_MESSAGE_CHARS],
            "attempts": attempts[failure.key],
            "updated_at": now,
        }
    table = pa.Table.from_pylist(list(rows.values()), QUARANTINE_SCHEMA)
    db.upsert(st.QUARANTINE, table, "quarantine_id")


def clear(db: st.Database, keys: list[str]) -> None:
    """Remove the rows of items that have now succeeded."""
    if not keys or not db.has_table(st.QUARANTINE):
        return
    for where in in_chunks("quarantine_id", keys):
        db.delete(st.QUARANTINE, where)
