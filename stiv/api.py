"""The Python API: query curated clips, freeze snapshots and feed training, from a notebook.

    import stiv
    db = stiv.open("demo_data/db")                       # a directory or s3://bucket/db
    db.count("aesthetic_score > 5")
    rows = db.query("motion_score > 2", columns=["clip_id", "uri"], order_by="aesthetic_score",
                    desc=True, limit=20).to_pandas()

Every method raises `QueryError` with the same one-line message `stiv query` prints; the CLI is
a thin layer over this module. Storage and filters live in `data_engine.store`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from data_engine.store import CLIPS, Database, FilterSummary, Snapshot, StoreError

if TYPE_CHECKING:
    import ray.data


class QueryError(StoreError):
    """A query, filter, snapshot or search that cannot run; the message is one line."""


@contextmanager
def _query_errors() -> Iterator[None]:
    """Turn every user-fixable error below the API into a `QueryError` with the same text."""
    from data_engine.stages.base import StageError

    try:
        yield
    except QueryError:
        raise
    except (StoreError, StageError, ValueError) as err:
        raise QueryError(str(err)) from None


class StivDatabase:
    """A curated database: the clips table and its snapshots (use `stiv.open`)."""

    def __init__(self, uri: str | Path, storage_options: dict[str, str] | None = None) -> None:
        with _query_errors():
            self.store = Database(uri, storage_options)

    @property
    def uri(self) -> str:
        return self.store.uri

    def __repr__(self) -> str:
        return f"stiv.open({self.uri!r})"

    def tables(self) -> list[str]:
        """Names of the tables in the database (`clips`, `videos`, `snapshots`, ...)."""
        return self.store.tables()

    def _require(self, table: str) -> None:
        if not self.store.has_table(table):
            have = ", ".join(self.store.tables()) or "none"
            raise QueryError(f"--table {table!r}: no such table in {self.uri} (have: {have})")

    def query(
        self,
        where: str | None = None,
        columns: list[str] | None = None,
        order_by: str | None = None,
        desc: bool = False,
        limit: int | None = None,
        *,
        table: str = CLIPS,
        snapshot: str | None = None,
        version: int | None = None,
    ) -> pa.Table:
        """Rows passing `where` (one SQL boolean expression) as a pyarrow Table
        (`.to_pandas()` for a DataFrame). `snapshot` reads that snapshot's pinned rows (its
        filter AND `where`); `version` reads an older table version."""
        if desc and order_by is None:
            raise QueryError("--desc: give --order-by COLUMN to sort by")
        with _query_errors():
            if snapshot is None:
                self._require(table)
            return self.store.query(
                table, where, columns, order_by, desc, limit, version=version, snapshot=snapshot
            )

    def count(
        self,
        where: str | None = None,
        *,
        table: str = CLIPS,
        snapshot: str | None = None,
        version: int | None = None,
    ) -> int:
        """Number of rows passing `where` (of a snapshot or table version when given)."""
        with _query_errors():
            if snapshot is None:
                self._require(table)
            return self.store.count(table, where, version=version, snapshot=snapshot)

    def summary(
        self,
        where: str | None = None,
        *,
        table: str = CLIPS,
        snapshot: str | None = None,
        version: int | None = None,
    ) -> FilterSummary:
        """What `where` keeps: clips, hours of video and share of the table; use it to choose
        thresholds."""
        with _query_errors():
            if snapshot is None:
                self._require(table)
            return self.store.summary(table, where, version=version, snapshot=snapshot)

    def snapshots(self) -> list[Snapshot]:
        """Every snapshot, oldest first."""
        with _query_errors():
            return self.store.list_snapshots()

    def snapshot(self, name: str) -> Snapshot:
        """The record of one snapshot: filter, table, pinned version, rows, created time."""
        with _query_errors():
            return self.store.snapshot(name)

    def create_snapshot(
        self, name: str, where: str | None = None, *, table: str = CLIPS
    ) -> Snapshot:
        """Pin the table's current version under `name` with the rows `where` keeps."""
        with _query_errors():
            self._require(table)
            return self.store.create_snapshot(name, where, table=table)

    def text_search(
        self,
        text: str,
        where: str | None = None,
        limit: int = 10,
        columns: list[str] | None = None,
        *,
        order_by: str | None = None,
        desc: bool = False,
        snapshot: str | None = None,
        clip_model_loader_args: dict[str, Any] | None = None,
    ) -> pa.Table:
        """The `limit` clips nearest to `text` by CLIP similarity among those passing `where`,
        best first, with `similarity` (cosine, -1..1); `order_by` re-sorts those `limit`
        clips by a column instead. Needs the `embedding` stage's `clip_embedding`."""
        from data_engine.stages.search import text_search

        if desc and order_by is None:
            raise QueryError("--desc: give --order-by COLUMN to sort by")
        with _query_errors():
            if snapshot is None:
                self._require(CLIPS)
                ds = self.store.table(CLIPS)
                where = self.store.checked_filter(ds, where)
            else:
                ds, where = self.store.resolve(CLIPS, where, None, snapshot)
            names = set(ds.schema.names) | {"similarity", "_distance"}
            for col in [*(columns or []), *([order_by] if order_by else [])]:
                if col not in names:
                    raise QueryError(f"--columns/--order-by: unknown column {col!r}")
            wanted = None if columns is None else [c for c in columns if c in ds.schema.names]
            if order_by and wanted is not None and order_by in ds.schema.names:
                wanted = list(dict.fromkeys([*wanted, order_by]))
            rows = text_search(ds, text, clip_model_loader_args, where, limit, wanted)
            if order_by:
                rows = rows.sort_by([(order_by, "descending" if desc else "ascending")])
            if columns is not None:
                rows = rows.select(columns)
            return rows

    def to_ray_dataset(
        self,
        snapshot: str | None = None,
        where: str | None = None,
        columns: list[str] | None = None,
        *,
        table: str = CLIPS,
    ) -> ray.data.Dataset:
        """A Ray Dataset of a snapshot's pinned rows (or of the latest table through
        `where`), read by Lance's Ray connector in parallel, for training jobs."""
        import lance_ray

        with _query_errors():
            if snapshot is None:
                self._require(table)
                ds = self.store.table(table)
                where = self.store.checked_filter(ds, where)
            else:
                ds, where = self.store.resolve(table, where, None, snapshot)
            if columns is not None:
                missing = [c for c in columns if c not in ds.schema.names]
                if missing:
                    raise QueryError(f"--columns: unknown column {missing[0]!r}")
            return lance_ray.read_lance(
                ds.uri,
                columns=columns,
                filter=where,
                storage_options=self.store.storage_options,
                dataset_options={"version": ds.version},
            )

    def optimize(
        self, tables: list[str] | None = None, cluster_by: str | None = None
    ) -> dict[str, dict[str, Any]]:
        """Compact, refresh indexes and drop old versions no snapshot pins (`stiv db
        optimize`); with `cluster_by`, also sort each fragment by that column so filters on
        it prune (remembered by later calls; "none" stops). Returns per table fragments
        before/after, fragments clustered and versions removed."""
        with _query_errors():
            return self.store.optimize(tables, cluster_by)


def open(uri: str | Path, storage_options: dict[str, str] | None = None) -> StivDatabase:
    """Open the database at a directory or object-store URI (`s3://bucket/db`; credentials
    from the standard AWS environment variables unless `storage_options` is given)."""
    return StivDatabase(uri, storage_options)
