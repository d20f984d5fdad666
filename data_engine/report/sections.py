"""What each report section says, read from the database with projected, bounded scans.

Every function returns plain dataclasses (no HTML); a section whose columns or table are
missing returns its reason in `absent`, and the page says so instead of failing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_engine.report.scan import (
    CATEGORY,
    DURATION,
    ScanResult,
    Selection,
    and_filter,
    count_rows,
    fetch_rows,
    iter_batches,
    sql_string,
)
from data_engine.store import DSG_CLAIMS, QUARANTINE, VIDEOS, Database, Snapshot

CLIP_COLUMNS = ["clip_id", "uri", "video_id", "start_s", "end_s"]  # what a thumbnail needs
PROVENANCE_SAMPLE_ROWS = 2000  # sampled clips whose provenance JSON is read
_PROVENANCE_KEYS = ("model_name", "model", "engine", "backend", "checkpoint_sha256")
QUARANTINE_ROWS_PER_KIND = 3  # example rows shown per (stage, error_type)
DUPLICATE_SCAN_ROWS = 10_000  # duplicate rows grouped (the first ones of the selection)
DUPLICATE_GROUPS = 6  # groups shown
DUPLICATES_PER_GROUP = 4  # duplicates shown beside each kept clip
DSG_EXAMPLES = 4  # clips with hallucinations shown with their failed claims
DSG_TOP_OBJECTS = 15  # most often hallucinated objects listed
_FAILED_VERDICTS = ("hallucinated", "false")
# data_engine.captioning.report.REQUIRED_COLUMNS, repeated here so that a table without DSG
# results never imports the captioning package (its HTTP client costs 0.2 s of start-up).
DSG_COLUMNS = ("dsg_status", "dsg_num_objects", "dsg_num_hallucinated")
_CLAIM_COLUMNS = ("clip_id", "question_id", "kind", "question", "object", "verdict")
_CLAIM_COLUMNS += ("frame_times_s", "frame_answers")


def _utc(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M UTC")


# ------------------------------------------------------------------------------------------
# Overview


@dataclass
class StageProvenance:
    """One `<stage>_provenance` column: what produced the stage's scores, over a sample."""

    stage: str
    variants: list[tuple[str, int, str]]  # (summary, sampled clips with it, full JSON)
    sampled: int  # sampled clips read


@dataclass
class Overview:
    """Headline numbers of the database and the selection."""

    selection: str
    clips: int  # selected clips
    clips_in_table: int  # clips at the selection's table version
    hours: float  # selected clips' summed duration (hours)
    videos: dict[str, int]  # status -> videos (whole database)
    video_hours: float | None  # duration of `done` videos (hours); None without the column
    quarantined_videos: int | None  # None without a quarantine table
    quarantined_clips: int | None
    curated: str  # time range of the videos' last updates (UTC), or why unknown
    coverage: list[tuple[str, int]]  # score column -> selected clips that have it
    provenance: list[StageProvenance]


def overview(db: Database, selection: Selection, scan: ScanResult) -> Overview:
    videos, video_hours, curated = _videos_summary(db)
    q_videos, q_clips = _quarantine_counts(db)
    coverage = [(h.spec.key, h.total) for h in scan.histograms if h.spec.columns == (h.spec.key,)]
    return Overview(
        selection=selection.label,
        clips=scan.num_rows,
        clips_in_table=selection.dataset.count_rows(),
        hours=scan.hours,
        videos=videos,
        video_hours=video_hours,
        quarantined_videos=q_videos,
        quarantined_clips=q_clips,
        curated=curated,
        coverage=coverage,
        provenance=_provenance(selection, scan.sample.row_ids[:PROVENANCE_SAMPLE_ROWS]),
    )


def _videos_summary(db: Database) -> tuple[dict[str, int], float | None, str]:
    if not db.has_table(VIDEOS):
        return {}, None, "unknown (no videos table)"
    dataset = db.table(VIDEOS)
    names = set(dataset.schema.names)
    columns = [c for c in ("status", "duration_s", "updated_at") if c in names]
    statuses: dict[str, int] = {}
    done_s, first, last = 0.0, np.inf, -np.inf
    for batch in iter_batches(dataset, columns, None, with_row_id=True):
        status = batch.column("status") if "status" in names else pa.nulls(batch.num_rows)
        for item in pc.value_counts(status.cast(pa.string()).fill_null("unknown")).to_pylist():
            statuses[item["values"]] = statuses.get(item["values"], 0) + item["counts"]
        if "duration_s" in names and "status" in names:
            done = pc.equal(batch.column("status"), "done")
            done_s += float(pc.sum(batch.column("duration_s").filter(done)).as_py() or 0.0)
        if "updated_at" in names:
            bounds = pc.min_max(batch.column("updated_at")).as_py()
            if bounds["min"] is not None:
                first, last = min(first, bounds["min"]), max(last, bounds["max"])
    curated = f"{_utc(first)} to {_utc(last)}" if last >= first else "unknown (no updated_at)"
    return statuses, done_s / 3600.0 if "duration_s" in names else None, curated


def _quarantine_counts(db: Database) -> tuple[int | None, int | None]:
    if not db.has_table(QUARANTINE):
        return None, None
    rows = db.table(QUARANTINE).to_table(columns=["video_id", "clip_id"])
    whole = rows.filter(pc.is_null(rows["clip_id"]))
    clips = rows.filter(pc.is_valid(rows["clip_id"]))
    return len(pc.unique(whole["video_id"])), len(pc.unique(clips["clip_id"]))


def _provenance(selection: Selection, row_ids: np.ndarray) -> list[StageProvenance]:
    columns = [n for n in selection.dataset.schema.names if n.endswith("_provenance")]
    if not columns or len(row_ids) == 0:
        return []
    rows = fetch_rows(selection.dataset, row_ids, columns)
    out = []
    for column in columns:
        counts = pc.value_counts(rows[column].drop_null()).to_pylist()
        variants = [
            (_provenance_summary(c["values"]), c["counts"], c["values"])
            for c in sorted(counts, key=lambda c: -c["counts"])
        ]
        out.append(StageProvenance(column[: -len("_provenance")], variants, rows.num_rows))
    return out


def _provenance_summary(text: str) -> str:
    """Model names, engines and checkpoint hashes found anywhere in a provenance JSON."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return text[:120]
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _PROVENANCE_KEYS and isinstance(value, str | int | float):
                    found.append(f"{key} {value}")
                walk(value)

    walk(record)
    if isinstance(record, dict) and record.get("seeded_test_weights"):
        found.append("seeded test weights")
    return ", ".join(dict.fromkeys(found)) or ", ".join(sorted(record)[:6])


# ------------------------------------------------------------------------------------------
# Filters (snapshots)


@dataclass
class SnapshotSummary:
    """One snapshot: its filter, rows, hours and the share it keeps of each category."""

    snapshot: Snapshot
    hours: float | None  # None without a duration_s column
    kept: dict[str, tuple[int, int]]  # category -> (kept, at that version)


def snapshot_summaries(db: Database) -> list[SnapshotSummary]:
    out = []
    for snap in db.list_snapshots():
        dataset, _ = db.snapshot_dataset(snap.name)
        names = set(dataset.schema.names)
        hours = None
        if DURATION in names:
            seconds = sum(
                float(pc.sum(b.column(DURATION)).as_py() or 0.0)
                for b in iter_batches(dataset, [DURATION], snap.where or None)
            )
            hours = seconds / 3600.0
        kept: dict[str, tuple[int, int]] = {}
        if CATEGORY in names:
            totals = _category_counts(dataset, None)
            chosen = _category_counts(dataset, snap.where or None)
            kept = {name: (chosen.get(name, 0), total) for name, total in totals.items()}
        out.append(SnapshotSummary(snap, hours, kept))
    return out


def _category_counts(dataset: Any, where: str | None) -> dict[str, int]:
    counts: dict[str, int] = {}
    for batch in iter_batches(dataset, [CATEGORY], where):
        for item in pc.value_counts(batch.column(CATEGORY).fill_null("(none)")).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return counts


# ------------------------------------------------------------------------------------------
# Captions and DSG-Video


@dataclass
class FailedClaim:
    """A DSG question that failed: the frames it was checked on and each frame's answer."""

    kind: str
    question: str
    object: str
    verdict: str
    frame_times_s: list[float]  # seconds from the start of the video
    frame_answers: list[str]


@dataclass
class DsgExample:
    clip: dict[str, Any]  # CLIP_COLUMNS plus caption and the DSG counts
    claims: list[FailedClaim]


@dataclass
class DsgSection:
    absent: str = ""  # why there is nothing to show; empty when there is
    captioned: int | None = None  # selected clips with a caption; None without the column
    metrics: dict[str, Any] = field(default_factory=dict)  # dsg_report over the selection
    top_objects: list[tuple[str, int]] = field(default_factory=list)
    examples: list[DsgExample] = field(default_factory=list)
    claims_absent: str = ""  # why claims (objects, examples) are missing


def dsg_section(db: Database, selection: Selection) -> DsgSection:
    names = set(selection.dataset.schema.names)
    section = DsgSection()
    if "caption" in names:
        section.captioned = count_rows(
            selection.dataset, and_filter(selection.where, "caption IS NOT NULL")
        )
    missing = [c for c in DSG_COLUMNS if c not in names]
    if missing:
        section.absent = (
            f"No DSG-Video results: the clips table has no {', '.join(missing)} "
            "(run the dsg stage: `stiv curate --db DB --stages caption,dsg`)."
        )
        return section
    section.metrics = _dsg_metrics(selection, names)
    hallucinated = _hallucinated_clip_ids(selection)
    if not db.has_table(DSG_CLAIMS):
        section.claims_absent = "No dsg_claims table: per-question claims were not stored."
        return section
    claims = db.table(DSG_CLAIMS)
    section.top_objects = _top_objects(claims, hallucinated)
    section.examples = _dsg_examples(selection, claims, hallucinated[:DSG_EXAMPLES], names)
    return section


def _dsg_metrics(selection: Selection, names: set[str]) -> dict[str, Any]:
    """dsg_report per batch, its counts summed and both percentages recomputed from them."""
    from data_engine.captioning.report import dsg_report

    optional = ("dsg_num_attr_rel", "dsg_num_attr_rel_false", "dsg_num_attr_rel_skipped")
    columns = [*DSG_COLUMNS, *(c for c in optional if c in names)]
    totals: dict[str, int] = {}
    for batch in iter_batches(selection.dataset, columns, selection.where):
        for key, value in dsg_report(pa.Table.from_batches([batch])).items():
            if isinstance(value, int):
                totals[key] = totals.get(key, 0) + value
    objects, captions = totals.get("objects", 0), totals.get("captions", 0)
    metrics: dict[str, Any] = dict(totals)
    hallucinated = totals.get("hallucinated_objects", 0)
    with_hallucination = totals.get("captions_with_hallucination", 0)
    metrics["dsg_video_i"] = 100.0 * hallucinated / objects if objects else None
    metrics["dsg_video_s"] = 100.0 * with_hallucination / captions if captions else None
    return metrics


def _hallucinated_clip_ids(selection: Selection) -> list[str]:
    where = and_filter(selection.where, "dsg_status = 'ok' AND dsg_num_hallucinated > 0")
    ids: list[str] = []
    for batch in iter_batches(selection.dataset, ["clip_id"], where):
        ids += batch.column("clip_id").to_pylist()
    return ids


def _top_objects(claims: Any, clip_ids: list[str]) -> list[tuple[str, int]]:
    if not clip_ids:
        return []
    wanted = pa.array(clip_ids)
    counts: dict[str, int] = {}
    for batch in iter_batches(claims, ["clip_id", "object"], "verdict = 'hallucinated'"):
        rows = pa.Table.from_batches([batch])
        rows = rows.filter(pc.is_in(rows["clip_id"], wanted))
        for item in pc.value_counts(rows["object"].fill_null("(none)")).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ordered[:DSG_TOP_OBJECTS]


def _dsg_examples(
    selection: Selection, claims: Any, clip_ids: list[str], names: set[str]
) -> list[DsgExample]:
    if not clip_ids:
        return []
    in_list = ", ".join(sql_string(c) for c in clip_ids)
    columns = [*CLIP_COLUMNS, "dsg_num_objects", "dsg_num_hallucinated"]
    columns += ["caption"] if "caption" in names else []
    clips = selection.dataset.to_table(columns=columns, filter=f"clip_id IN ({in_list})")
    verdicts = ", ".join(sql_string(v) for v in _FAILED_VERDICTS)
    rows = claims.to_table(
        columns=[*_CLAIM_COLUMNS],
        filter=f"clip_id IN ({in_list}) AND verdict IN ({verdicts})",
    ).to_pylist()
    by_clip: dict[str, list[FailedClaim]] = {}
    for row in sorted(rows, key=lambda r: (r["clip_id"], r["question_id"])):
        claim = FailedClaim(
            row["kind"] or "",
            row["question"] or "",
            row["object"] or "",
            row["verdict"] or "",
            list(row["frame_times_s"] or []),
            list(row["frame_answers"] or []),
        )
        by_clip.setdefault(row["clip_id"], []).append(claim)
    order = {c: i for i, c in enumerate(clip_ids)}
    examples = [DsgExample(clip, by_clip.get(clip["clip_id"], [])) for clip in clips.to_pylist()]
    return sorted(examples, key=lambda e: order[e.clip["clip_id"]])


# ------------------------------------------------------------------------------------------
# Quarantine


@dataclass
class QuarantineKind:
    stage: str
    error_type: str
    count: int
    examples: list[dict[str, Any]]  # uri, clip_id, message, attempts, updated_at


@dataclass
class QuarantineSection:
    absent: str = ""
    kinds: list[QuarantineKind] = field(default_factory=list)


def quarantine_section(db: Database) -> QuarantineSection:
    if not db.has_table(QUARANTINE) or db.count(QUARANTINE) == 0:
        return QuarantineSection(absent="No quarantined videos or clips: every input decoded.")
    dataset = db.table(QUARANTINE)
    keys = dataset.to_table(columns=["stage", "error_type"])
    grouped = keys.group_by(["stage", "error_type"]).aggregate([("stage", "count")])
    kinds = []
    for row in sorted(grouped.to_pylist(), key=lambda r: (-r["stage_count"], r["stage"] or "")):
        where = " AND ".join(
            f"{column} IS NULL" if row[column] is None else f"{column} = {sql_string(row[column])}"
            for column in ("stage", "error_type")
        )
        columns = [
            c
            for c in ("uri", "clip_id", "message", "attempts", "updated_at")
            if c in dataset.schema.names
        ]
        examples = dataset.to_table(
            columns=columns, filter=where, limit=QUARANTINE_ROWS_PER_KIND
        ).to_pylist()
        kinds.append(
            QuarantineKind(
                row["stage"] or "", row["error_type"] or "", row["stage_count"], examples
            )
        )
    return QuarantineSection(kinds=kinds)


# ------------------------------------------------------------------------------------------
# Duplicates


@dataclass
class DuplicateGroup:
    kept: dict[str, Any]  # CLIP_COLUMNS of the clip the others duplicate
    duplicates: list[dict[str, Any]]
    size: int  # duplicates of `kept` among the scanned rows


@dataclass
class DuplicateSection:
    absent: str = ""
    total: int = 0  # selected clips marked as duplicates
    scanned: int = 0  # of those, grouped here
    groups: list[DuplicateGroup] = field(default_factory=list)


def duplicate_section(selection: Selection) -> DuplicateSection:
    if "dup_of" not in selection.dataset.schema.names:
        return DuplicateSection(
            absent="No dup_of column: the dedup stage has not run on this table."
        )
    where = and_filter(selection.where, "dup_of IS NOT NULL")
    total = count_rows(selection.dataset, where)
    if total == 0:
        return DuplicateSection(absent="No near-duplicates among the selected clips.")
    pairs = pa.Table.from_batches(
        list(
            iter_batches(selection.dataset, ["clip_id", "dup_of"], where, limit=DUPLICATE_SCAN_ROWS)
        )
    )
    sizes = pairs.group_by("dup_of").aggregate([("clip_id", "count")]).to_pylist()
    sizes.sort(key=lambda r: (-r["clip_id_count"], r["dup_of"]))
    chosen = sizes[:DUPLICATE_GROUPS]
    members: dict[str, list[str]] = {r["dup_of"]: [] for r in chosen}
    for row in pairs.to_pylist():
        group = members.get(row["dup_of"])
        if group is not None and len(group) < DUPLICATES_PER_GROUP:
            group.append(row["clip_id"])
    wanted = [*members, *(c for group in members.values() for c in group)]
    in_list = ", ".join(sql_string(c) for c in wanted)
    # Kept clips may lie outside the selection: read them from the whole table version.
    rows = {
        r["clip_id"]: r
        for r in selection.dataset.to_table(
            columns=CLIP_COLUMNS, filter=f"clip_id IN ({in_list})"
        ).to_pylist()
    }
    groups = [
        DuplicateGroup(rows[kept], [rows[c] for c in dups if c in rows], size["clip_id_count"])
        for (kept, dups), size in zip(members.items(), chosen)
        if kept in rows
    ]
    return DuplicateSection(total=total, scanned=pairs.num_rows, groups=groups)
