"""The database: one directory (or object-store URI) of Lance tables.

Tables (ARCHITECTURE.md): `videos`, `clips`, `quarantine`, `dsg_claims`, `snapshots`, and
the latents tables written by `stiv prepare`. This module is the only place that knows where a
table lives and how rows are upserted, deleted, queried and pinned by snapshots.

Driver-side writes here are small (video rows, quarantine rows, snapshot records). Clip rows
are written from Ray Data with `lance_ray.write_lance` by the pipeline (ENV-NOTES.md: Ray's
own `Dataset.write_lance` is broken with pylance 14).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lance
import pyarrow as pa

VIDEOS = "videos"
CLIPS = "clips"
QUARANTINE = "quarantine"
DSG_CLAIMS = "dsg_claims"
SNAPSHOTS = "snapshots"

_SCAN_BATCH_ROWS = 1 << 16  # rows per scan batch for filters (bench/query.py)
_SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Columns that deserve a scalar index: the ones queries select on, chosen by measurement
# (ENV-NOTES.md: a BTREE on every unselective score column made combined filters slower).
# Keys and statuses are looked up exactly (resume, upserts), so they are indexed.
_INDEXED = {VIDEOS: {"video_id": "BTREE", "status": "BITMAP"}, CLIPS: {"video_id": "BTREE"}}


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


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


class Database:
    """A directory or URI holding the project's Lance tables."""

    def __init__(self, uri: str | Path, storage_options: dict[str, str] | None = None) -> None:
        uri = str(uri)
        if uri.startswith("file://"):
            uri = uri[len("file://") :]
        self.uri = str(Path(uri).absolute()) if is_local(uri) else uri.rstrip("/")
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
        columns = []
        for field in existing:
            if field.name in data.column_names:
                columns.append(data.column(field.name).cast(field.type))
            else:
                columns.append(pa.nulls(data.num_rows, field.type))
        return pa.table(columns, schema=existing)

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
        """Create the scalar indexes this table benefits from (see `_INDEXED`), once."""
        if not self.has_table(table):
            return
        ds = self.table(table)
        have = {tuple(i.field_names) for i in ds.describe_indices()}
        for column, kind in _INDEXED.get(table, {}).items():
            if column in ds.schema.names and (column,) not in have:
                ds.create_scalar_index(column, kind)

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
    ) -> pa.Table:
        ds = self.table(table, version=version)
        _check_columns(ds, columns, order_by)
        try:
            if order_by is None:
                return ds.to_table(columns=columns, filter=where or None, limit=limit)
            cols = None if columns is None else list(dict.fromkeys([*columns, order_by]))
            rows = ds.to_table(columns=cols, filter=where or None)
        except (ValueError, OSError, RuntimeError) as err:
            raise StoreError(f"--where {where!r}: {_first_line(err)}") from None
        rows = rows.sort_by([(order_by, "descending" if desc else "ascending")])
        if limit is not None:
            rows = rows.slice(0, limit)
        return rows.select(columns) if columns is not None else rows

    def count(self, table: str = CLIPS, where: str | None = None) -> int:
        ds = self.table(table)
        try:
            # A row-id-only scan in large batches: measured faster than `count_rows(filter=)`
            # here (bench/query.py), which evaluates the filter in small batches.
            return ds.scanner(
                filter=where or None, columns=[], with_row_id=True, batch_size=_SCAN_BATCH_ROWS
            ).count_rows()
        except (ValueError, OSError, RuntimeError) as err:
            raise StoreError(f"--where {where!r}: {_first_line(err)}") from None

    def validate_filter(self, table: str, where: str | None) -> None:
        """Reject a bad filter before any work starts (runs it on zero rows)."""
        if not where:
            return
        ds = self.table(table)
        try:
            ds.scanner(filter=where, columns=[ds.schema.names[0]], limit=0).to_table()
        except (ValueError, OSError, RuntimeError) as err:
            raise StoreError(f"--where {where!r}: {_first_line(err)}") from None

    # -- snapshots -------------------------------------------------------------------------
    def create_snapshot(self, name: str, where: str | None, table: str = CLIPS) -> Snapshot:
        """Record `where` and pin the table's current version under a Lance tag, so a training
        run reads exactly these rows even after the table grows."""
        if not _SNAPSHOT_NAME.match(name):
            raise StoreError(f"--name {name!r}: use letters, digits, '_', '-', '.' (max 128)")
        if any(s.name == name for s in self.list_snapshots()):
            raise StoreError(f"--name {name!r}: a snapshot with this name already exists")
        self.validate_filter(table, where)
        ds = self.table(table)
        version = ds.version
        num_rows = self.count(table, where)
        ds.tags.create(_tag(name), version)
        snap = Snapshot(name, table, version, where or "", num_rows, time.time())
        self.write(SNAPSHOTS, pa.Table.from_pylist([asdict(snap)]))
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
        ds, snap = self.snapshot_dataset(name)
        return ds.to_table(columns=columns, filter=snap.where or None)


def _tag(snapshot_name: str) -> str:
    return f"snapshot-{snapshot_name}"


def _check_columns(ds: lance.LanceDataset, columns: list[str] | None, order_by: str | None) -> None:
    names = set(ds.schema.names)
    for col in [*(columns or []), *([order_by] if order_by else [])]:
        if col not in names:
            raise StoreError(
                f"--columns/--order-by: unknown column {col!r} (have: {', '.join(sorted(names))})"
            )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def rows_to_json(rows: pa.Table) -> str:
    """Rows as one JSON array of objects (embeddings and bytes made JSON-safe)."""

    def safe(value: Any) -> Any:
        if isinstance(value, bytes):
            return value.hex()
        if isinstance(value, float) and value != value:  # NaN
            return None
        return value

    return json.dumps([{k: safe(v) for k, v in r.items()} for r in rows.to_pylist()], default=str)
