"""The database: one directory (or object-store URI) of Lance tables.

Tables (docs/architecture.md "Storage"): `videos`, `clips`, `quarantine`, `dsg_claims`,
`snapshots`, and the latents tables written by `stiv prepare`. This module is the only place
that knows where a table lives and how rows are upserted, deleted, queried and pinned by
snapshots.

Driver-side writes here are small (video rows, quarantine rows, snapshot records). Clip rows
are written from Ray Data with `lance_ray.write_lance` by the pipeline (Ray's own
`Dataset.write_lance` is broken with pylance 14: docs/design-notes.md "Ray Data behaviours we
work around").
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lance
import pyarrow as pa
import pyarrow.compute as pc
from lance.dataset import ColumnOrdering

from data_engine.filters import FilterError, check_filter
from data_engine.schema import conform
from stiv_core.uris import is_local, local_path

VIDEOS = "videos"
CLIPS = "clips"
QUARANTINE = "quarantine"
DSG_CLAIMS = "dsg_claims"
SNAPSHOTS = "snapshots"

_SCAN_BATCH_ROWS = 1 << 16  # rows per scan batch for filters (bench/query.py)
_SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Columns that deserve a scalar index: the ones queries select on, chosen by measurement.
# Keys and statuses are looked up exactly (resume, upserts), so they are indexed. Score columns
# are not: bench/query.py's filter (3 score predicates, 0.33% of rows) on 1M / 10M rows, medians
# of 7 in one process on the shared 2-core machine: no index counted in 9.9 / 88 ms, a BTREE on
# the most selective column (aesthetic_score) in 22 / 152 ms, ZONEMAPs on all three in 14 ms
# at 1M (scores are not clustered by row order, so zone maps prune nothing); fetch and top-20
# were slower with either index too, as for a BTREE on every column (docs/design-notes.md "Lance").
_INDEXED = {VIDEOS: {"video_id": "BTREE", "status": "BITMAP"}, CLIPS: {"video_id": "BTREE"}}
# Compaction target, rows per fragment: Lance's own write default (`max_rows_per_file`), which
# the 10M-row benchmark table uses (10 fragments). Data storage version stays Lance's default
# (2.0): 2.1 was no faster here (1M rows: count 8.8 vs 9.9 ms, fetch 31.8 vs 31.3 ms; 10M
# rows: 133 vs 88 ms and 428 vs 247 ms, same run as above).
_FRAGMENT_ROWS = 1 << 20
# `stiv db optimize --cluster-by COLUMN` remembers its column under this table-metadata key;
# CLUSTER_NONE forgets it.
_CLUSTER_KEY = "stiv.cluster_by"
CLUSTER_NONE = "none"


class StoreError(RuntimeError):
    """The database or a table cannot be used (unreachable storage, missing table, bad filter)."""


@dataclass(frozen=True)
class Snapshot:
    """A named selection of rows pinned to a table version (a Lance tag holds the version)."""

    name: str
    table: str
    version: int
    where: str
    num_rows: int
    created_at: float


@dataclass(frozen=True)
class FilterSummary:
    """What a filter keeps of a table version: rows, hours of video and share of the rows."""

    table: str
    version: int
    where: str
    num_rows: int
    total_rows: int
    hours: float  # sum of the kept rows' duration_s / 3600

    @property
    def share(self) -> float:
        """Kept rows / all rows of that version (0.0 for an empty table)."""
        return self.num_rows / self.total_rows if self.total_rows else 0.0


def storage_options_from_env(uri: str) -> dict[str, str] | None:
    """Object-store settings for `s3://` URIs from the standard AWS environment variables."""
    if not uri.startswith(("s3://", "s3a://")):
        return None
    env_keys = {
        "AWS_ACCESS_KEY_ID": "aws_access_key_id",
        "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
        "AWS_SESSION_TOKEN": "aws_session_token",
        "AWS_REGION": "region",
        "AWS_DEFAULT_REGION": "region",
        "AWS_ENDPOINT_URL": "endpoint",
        "AWS_ENDPOINT_URL_S3": "endpoint",
    }
    options: dict[str, str] = {}
    for env, key in env_keys.items():
        if os.environ.get(env):
            options.setdefault(key, os.environ[env])
    endpoint = options.get("endpoint", "")
    if endpoint.startswith("http://"):
        options["allow_http"] = "true"
    return options or None


class Database:
    """A directory or URI holding the project's Lance tables."""

    def __init__(self, uri: str | Path, storage_options: dict[str, str] | None = None) -> None:
        uri = str(uri)
        self.uri = local_path(uri) if is_local(uri) else uri.rstrip("/")
        self.storage_options = storage_options or storage_options_from_env(self.uri)
        if is_local(self.uri):
            Path(self.uri).mkdir(parents=True, exist_ok=True)

    # -- tables ----------------------------------------------------------------------------
    def uri_for(self, table: str) -> str:
        return f"{self.uri}/{table}.lance"

    def has_table(self, table: str) -> bool:
        if is_local(self.uri):
            return (Path(self.uri_for(table)) / "_versions").is_dir()
        try:
            self.table(table)
        except StoreError:
            return False
        return True

    def table(self, table: str, version: int | str | None = None) -> lance.LanceDataset:
        try:
            return lance.dataset(
                self.uri_for(table), version=version, storage_options=self.storage_options
            )
        except (ValueError, OSError) as err:
            raise StoreError(f"table {table!r} not found in {self.uri}: {err}") from None

    def tables(self) -> list[str]:
        if is_local(self.uri):
            return sorted(p.name[: -len(".lance")] for p in Path(self.uri).glob("*.lance"))
        return [t for t in (VIDEOS, CLIPS, QUARANTINE, DSG_CLAIMS, SNAPSHOTS) if self.has_table(t)]

    def write(self, table: str, data: pa.Table, mode: str = "append") -> lance.LanceDataset:
        """Append (or create) rows from the driver. Schemas evolve by promotion: a column the
        table lacks is added first (null for existing rows), a column missing from `data` is
        filled with nulls."""
        if mode == "append" and self.has_table(table):
            data = self._conform(table, data)
        elif mode == "append":
            mode = "create"
        return lance.write_dataset(
            data, self.uri_for(table), mode=mode, storage_options=self.storage_options
        )

    def _conform(self, table: str, data: pa.Table) -> pa.Table:
        ds = self.table(table)
        existing = ds.schema
        missing = [f for f in data.schema if f.name not in existing.names]
        if missing:
            ds.add_columns(pa.schema(missing))
            existing = self.table(table).schema
        return conform(data, existing)

    def upsert(self, table: str, data: pa.Table, on: str | list[str]) -> None:
        """Insert rows, replacing those with the same key (idempotent re-runs)."""
        if data.num_rows == 0:
            return
        if not self.has_table(table):
            self.write(table, data, mode="create")
            return
        data = self._conform(table, data)
        (
            self.table(table)
            .merge_insert(on)
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(data)
        )

    def delete(self, table: str, where: str) -> None:
        if self.has_table(table):
            self.table(table).delete(where)

    def ensure_indexes(self, table: str) -> None:
        """Create the scalar indexes this table benefits from (see `_INDEXED`), and fold rows
        appended since into the existing ones, so an index never covers only part of a table
        (unindexed fragments fall back to a full scan of those fragments)."""
        if not self.has_table(table):
            return
        ds = self.table(table)
        have = {tuple(i.field_names): i for i in ds.describe_indices()}
        for column, kind in _INDEXED.get(table, {}).items():
            if column in ds.schema.names and (column,) not in have:
                ds.create_scalar_index(column, kind)
        stale = [
            i.name
            for i in have.values()
            if ds.stats.index_stats(i.name).get("num_unindexed_rows", 0) > 0
        ]
        if stale:
            ds.optimize.optimize_indices(index_names=stale)

    def optimize(
        self, tables: list[str] | None = None, cluster_by: str | None = None
    ) -> dict[str, dict[str, Any]]:
        """Compact each table's fragments, fold new rows into its indexes and drop versions
        older than the current one, except those a snapshot's Lance tag pins (cleanup never
        removes a tagged version). With `cluster_by` (remembered in the table's metadata, so a
        later optimize keeps clustering; "none" forgets it) each fragment's rows are also
        sorted by that column, so its zone map prunes whole zones for filters on it (see
        `cluster`). Returns per table: fragments before/after, fragments clustered, versions
        removed, bytes freed."""
        names = tables or self.tables()
        if cluster_by is not None and cluster_by != CLUSTER_NONE:
            holders = [ds for ds in map(self.table, names) if cluster_by in ds.schema.names]
            if not holders:
                raise StoreError(
                    f"--cluster-by {cluster_by!r}: no table has this column "
                    f"(tables: {', '.join(names) or 'none'})"
                )
            for ds in holders:
                _check_orderable(ds, cluster_by)
        report: dict[str, dict[str, Any]] = {}
        for name in names:
            ds = self.table(name)
            before = len(ds.get_fragments())
            versions_before = len(ds.versions())
            ds.optimize.compact_files(target_rows_per_fragment=_FRAGMENT_ROWS)
            column = self._cluster_column(name, cluster_by)
            clustered = self.cluster(name, column) if column else 0
            self.ensure_indexes(name)
            ds = self.table(name)
            stats = ds.cleanup_old_versions(
                older_than=timedelta(0), error_if_tagged_old_versions=False
            )
            ds = self.table(name)
            report[name] = {
                "fragments_before": before,
                "fragments_after": len(ds.get_fragments()),
                "cluster_by": column,
                "fragments_clustered": clustered,
                "versions_before": versions_before,
                "versions_removed": stats.old_versions,
                "bytes_removed": stats.bytes_removed,
            }
        return report

    def _cluster_column(self, table: str, cluster_by: str | None) -> str | None:
        """The column `table` is clustered by: `cluster_by` when given (and remembered in the
        table's metadata), else the remembered one; None for no clustering."""
        ds = self.table(table)
        if cluster_by is None:
            column = ds.metadata.get(_CLUSTER_KEY)
            return column if column and column in ds.schema.names else None
        if cluster_by == CLUSTER_NONE:
            if _CLUSTER_KEY in ds.metadata:
                ds.update_metadata({_CLUSTER_KEY: None})
            return None
        if cluster_by not in ds.schema.names:
            return None
        if ds.metadata.get(_CLUSTER_KEY) != cluster_by:
            ds.update_metadata({_CLUSTER_KEY: cluster_by})
        return cluster_by

    def cluster(self, table: str, column: str) -> int:
        """Sort the rows of every fragment of `table` not yet in `column` order (ascending,
        nulls last), give the column a ZONEMAP index, and return the fragments rewritten.

        Why: scores are not ordered by the order clips are curated in, so a zone map on an
        unclustered table prunes nothing and every filter scans every row. Sorted within each
        fragment (about a million rows after compaction), a filter on `column` reads only the
        zones whose range it can match (bench/query.py: 10M rows, `aesthetic_score > 7.5 AND
        ...`, docs/design-notes.md "Lance"). Lance's compaction has no sort order, so this
        writes the sorted fragments itself and commits them as one Rewrite: rows appended
        meanwhile are kept (they are not in the rewritten fragments), a concurrent delete or
        update of the same fragments makes the commit fail instead of being lost. Indexes that
        covered the old fragments fall back to scanning the new ones until `ensure_indexes`
        folds them in. Memory: one fragment at a time, all its columns."""
        ds = self.table(table)
        _check_orderable(ds, column)
        groups = []
        for fragment in ds.get_fragments():
            keys = fragment.to_table(columns=[column])[column]
            if _in_order(keys):
                continue
            rows = fragment.to_table()
            rows = rows.take(pc.sort_indices(rows, sort_keys=[(column, "ascending", "at_end")]))
            new = lance.fragment.write_fragments(
                rows,
                ds,
                schema=ds.schema,
                max_rows_per_file=max(rows.num_rows, 1),
                storage_options=self.storage_options,
            )
            groups.append(lance.LanceOperation.RewriteGroup([fragment.metadata], new))
        if groups:
            try:
                lance.LanceDataset.commit(
                    ds.uri,
                    lance.LanceOperation.Rewrite(groups, []),
                    read_version=ds.version,
                    storage_options=self.storage_options,
                )
            except (ValueError, OSError, RuntimeError) as err:
                raise StoreError(f"--cluster-by {column!r}: {_first_line(err)}") from None
            ds = self.table(table)
        if not any(column in i.field_names for i in ds.describe_indices()):
            ds.create_scalar_index(column, "ZONEMAP")
        return len(groups)

    # -- queries ---------------------------------------------------------------------------
    def query(
        self,
        table: str = CLIPS,
        where: str | None = None,
        columns: list[str] | None = None,
        order_by: str | None = None,
        desc: bool = False,
        limit: int | None = None,
        version: int | str | None = None,
        snapshot: str | None = None,
    ) -> pa.Table:
        """Rows of `table` (or of a snapshot's pinned rows) passing `where`, sorted by
        `order_by` when given. With a limit, Lance keeps only the top `limit` rows while it
        scans (a top-k sort, never the whole filtered set) and reads the other columns for
        those rows only (late materialisation)."""
        ds, where = self.resolve(table, where, version, snapshot)
        _check_columns(ds, columns, order_by)
        if limit is not None and limit < 0:
            raise StoreError(f"--limit: must be >= 0, got {limit}")
        ordering, read = None, columns
        if order_by is not None:
            ordering = [ColumnOrdering(order_by, ascending=not desc, nulls_first=False)]
            # Lance 14's top-k plan fails ("TakeExec requires ... '_rowid'") when the sort
            # column is not projected, so it is read and dropped afterwards.
            read = None if columns is None else list(dict.fromkeys([*columns, order_by]))
        try:
            rows = ds.to_table(columns=read, filter=where or None, limit=limit, order_by=ordering)
        except (ValueError, OSError, RuntimeError) as err:
            label = f"--where {where!r}" if where else "query"
            raise StoreError(f"{label}: {_first_line(err)}") from None
        return rows if read == columns else rows.select(columns)

    def count(
        self,
        table: str = CLIPS,
        where: str | None = None,
        version: int | str | None = None,
        snapshot: str | None = None,
    ) -> int:
        ds, where = self.resolve(table, where, version, snapshot)
        return _count(ds, where)

    def summary(
        self,
        table: str = CLIPS,
        where: str | None = None,
        version: int | str | None = None,
        snapshot: str | None = None,
    ) -> FilterSummary:
        """What a filter keeps: rows, hours of video (sum of `duration_s`) and the share of
        the table (of the snapshot's pinned version when `snapshot` is given)."""
        ds, where = self.resolve(table, where, version, snapshot)
        total = ds.count_rows()
        if "duration_s" in ds.schema.names:
            try:
                durations = ds.to_table(columns=["duration_s"], filter=where or None)
            except (ValueError, OSError, RuntimeError) as err:
                raise StoreError(f"--where {where!r}: {_first_line(err)}") from None
            kept = durations.num_rows
            seconds = pc.sum(durations["duration_s"]).as_py() or 0.0
        else:
            kept, seconds = _count(ds, where), 0.0
        return FilterSummary(
            table=ds.uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".lance"),
            version=ds.version,
            where=where or "",
            num_rows=kept,
            total_rows=total,
            hours=float(seconds) / 3600.0,
        )

    def validate_filter(
        self, table: str, where: str | None, version: int | str | None = None
    ) -> None:
        """Reject a bad filter before any work starts: it must parse as exactly one boolean
        expression over the table's columns (data_engine/filters.py), then Lance must plan
        it (types)."""
        self.checked_filter(self.table(table, version=version), where)

    def checked_filter(self, ds: lance.LanceDataset, where: str | None) -> str | None:
        """`where` checked against `ds` (one boolean expression, known columns, planned by
        Lance), or None for an empty filter; raises `StoreError`."""
        if where is None or not where.strip():
            return None
        schema = ds.schema
        booleans = [f.name for f in schema if pa.types.is_boolean(f.type)]
        try:
            check_filter(where, schema.names, booleans)
            # Planning alone resolves columns and types: it raises every error the scan would,
            # in under 1 ms, where executing even a zero-row scan cost 28 ms on a 10M-row table
            # (it opens every fragment).
            ds.scanner(filter=where, columns=[schema.names[0]], limit=0).explain_plan()
        except FilterError as err:
            raise StoreError(f"--where {where!r}: {err}") from None
        except (ValueError, OSError, RuntimeError) as err:
            raise StoreError(f"--where {where!r}: {_first_line(err)}") from None
        return where

    def resolve(
        self,
        table: str,
        where: str | None,
        version: int | str | None,
        snapshot: str | None,
    ) -> tuple[lance.LanceDataset, str | None]:
        """The dataset to read (latest, a version, or a snapshot's pinned version) and the
        checked filter (a snapshot's own filter AND `where`)."""
        if snapshot is None:
            ds = self.table(table, version=version)
            return ds, self.checked_filter(ds, where)
        if version is not None:
            raise StoreError("--snapshot and --version: give one (a snapshot pins its version)")
        ds, snap = self.snapshot_dataset(snapshot)
        where = self.checked_filter(ds, where)
        if snap.where and where:
            return ds, f"({snap.where}) AND ({where})"
        return ds, snap.where or where

    # -- snapshots -------------------------------------------------------------------------
    def create_snapshot(self, name: str, where: str | None, table: str = CLIPS) -> Snapshot:
        """Record `where` and pin the table's current version under a Lance tag, so a training
        run reads exactly these rows even after the table grows.

        Atomic: the row count is taken on the pinned version (rows appended meanwhile are not
        counted), the tag is the claim on the name (Lance refuses a second tag of that name),
        and the record is written last; if that write fails, the tag is removed again. A tag
        left without a record by a killed run is reclaimed."""
        if not _SNAPSHOT_NAME.match(name):
            raise StoreError(f"--name {name!r}: use letters, digits, '_', '-', '.' (max 128)")
        if any(s.name == name for s in self.list_snapshots()):
            raise StoreError(f"--name {name!r}: a snapshot with this name already exists")
        ds = self.table(table)
        where = self.checked_filter(ds, where)
        num_rows = _count(ds, where)
        tags = ds.tags.list()
        if _tag(name) in tags:
            ds.tags.delete(_tag(name))  # left by a run killed before its record was written
        try:
            ds.tags.create(_tag(name), ds.version)
        except (ValueError, OSError, RuntimeError) as err:
            raise StoreError(f"--name {name!r}: {_first_line(err)}") from None
        snap = Snapshot(name, table, ds.version, where or "", num_rows, time.time())
        try:
            self.write(SNAPSHOTS, pa.Table.from_pylist([asdict(snap)]))
        except BaseException:
            ds.tags.delete(_tag(name))
            raise
        return snap

    def list_snapshots(self) -> list[Snapshot]:
        if not self.has_table(SNAPSHOTS):
            return []
        rows = self.table(SNAPSHOTS).to_table().to_pylist()
        return sorted((Snapshot(**r) for r in rows), key=lambda s: s.created_at)

    def snapshot(self, name: str) -> Snapshot:
        for snap in self.list_snapshots():
            if snap.name == name:
                return snap
        known = ", ".join(s.name for s in self.list_snapshots()) or "none"
        raise StoreError(f"--snapshot {name!r}: no such snapshot (known: {known})")

    def snapshot_dataset(self, name: str) -> tuple[lance.LanceDataset, Snapshot]:
        snap = self.snapshot(name)
        return self.table(snap.table, version=_tag(name)), snap

    def read_snapshot(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """The rows the snapshot selected, at its pinned version."""
        return self.query(columns=columns, snapshot=name)


def _count(ds: lance.LanceDataset, where: str | None) -> int:
    """Rows passing a checked filter. A row-id-only scan in large batches: measured faster
    than `count_rows(filter=)` (1M rows: 9.9 vs 21.6 ms; 10M: 88 vs 108 ms), which evaluates
    the filter in small batches."""
    try:
        return ds.scanner(
            filter=where or None, columns=[], with_row_id=True, batch_size=_SCAN_BATCH_ROWS
        ).count_rows()
    except (ValueError, OSError, RuntimeError) as err:
        raise StoreError(f"--where {where!r}: {_first_line(err)}") from None


def _check_orderable(ds: lance.LanceDataset, column: str) -> None:
    field = ds.schema.field(column)
    if pa.types.is_nested(field.type) or pa.types.is_binary(field.type):
        raise StoreError(f"--cluster-by {column!r}: a {field.type} column has no sort order")


def _in_order(keys: pa.ChunkedArray) -> bool:
    """True when `keys` is ascending with its nulls last (a clustered fragment)."""
    num_valid = len(keys) - keys.null_count
    if keys.slice(num_valid).null_count != len(keys) - num_valid:
        return False  # a null before a value
    valid = keys.slice(0, num_valid)
    if num_valid < 2:
        return True
    return bool(pc.all(pc.less_equal(valid.slice(0, num_valid - 1), valid.slice(1))).as_py())


def _tag(snapshot_name: str) -> str:
    return f"snapshot-{snapshot_name}"


def _check_columns(ds: lance.LanceDataset, columns: list[str] | None, order_by: str | None) -> None:
    names = set(ds.schema.names)
    for col in [*(columns or []), *([order_by] if order_by else [])]:
        if col not in names:
            raise StoreError(
                f"--columns/--order-by: unknown column {col!r} (have: {', '.join(sorted(names))})"
            )


_RUST_SOURCE = re.compile(r",\s*\S+\.rs:\d+:\d+")


def _first_line(err: BaseException) -> str:
    """The first line of a Lance error, without the Rust source locations it appends."""
    text = str(err).strip().splitlines()
    return _RUST_SOURCE.sub("", text[0]) if text else type(err).__name__


def rows_to_json(rows: pa.Table) -> str:
    """Rows as one JSON array of objects (embeddings and bytes made JSON-safe)."""

    def safe(value: Any) -> Any:
        if isinstance(value, bytes):
            return value.hex()
        if isinstance(value, float) and value != value:  # NaN
            return None
        return value

    return json.dumps([{k: safe(v) for k, v in r.items()} for r in rows.to_pylist()], default=str)
