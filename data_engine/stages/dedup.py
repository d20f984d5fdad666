"""Near-duplicate clips by CLIP embedding, read straight from the Lance clips table.

Clips are visited in a stable order (video `uri`, then `start_frame`, then `clip_id`); a clip
is a duplicate when its `clip_embedding` lies within `max_cosine_distance` (1 - cosine
similarity) of an earlier clip that was kept, and `dup_of` names the earliest such kept clip.
Kept clips never point anywhere, so following `dup_of` never takes more than one step.

Small tables are searched exactly in memory (blocked matrix products). From `index_min_rows`
rows on, the neighbours come from a Lance IVF_PQ index (metric cosine, exact re-ranking of the
candidates with `refine_factor`), streaming the table batch by batch so memory holds only the
ids, their order and the (sparse) duplicate pairs, never all embeddings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_engine.stages.base import Stage, StageError
from data_engine.stages.clip_config import normalize_rows


@dataclass
class DedupConfig:
    """Settings of the `dedup` stage."""

    max_cosine_distance: float = (
        0.05  # a clip within this of an earlier kept clip is a duplicate (1 - cosine)
    )
    index_min_rows: int = (
        50_000  # from this many rows on, search a Lance IVF_PQ index instead of exactly
    )
    num_neighbors: int = 16  # neighbours fetched per clip from the index (index path only)
    nprobes: int = (
        32  # IVF partitions searched per query (index path; more = better recall, slower)
    )
    refine_factor: int = (
        10  # candidates re-ranked with exact distances, as a multiple of num_neighbors
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_cosine_distance < 2.0:
            raise ValueError(
                f"dedup.max_cosine_distance: must be in [0, 2), got {self.max_cosine_distance}"
            )
        for key in ("index_min_rows", "num_neighbors", "nprobes", "refine_factor"):
            if getattr(self, key) < 1:
                raise ValueError(f"dedup.{key}: must be >= 1, got {getattr(self, key)}")


# ----------------------------------------------------------------------------------------------
# Order and the greedy pass shared by both search paths


def _stable_order(
    dataset: lance.LanceDataset,
    id_column: str,
    order_columns: Sequence[str],
    embedding_column: str,
) -> pa.Array:
    """Clip ids of rows with an embedding, sorted by `order_columns` then id (the keep order)."""
    columns = [*order_columns, id_column]
    table = dataset.to_table(columns=columns, filter=f"{embedding_column} IS NOT NULL")
    indices = pc.sort_indices(table, sort_keys=[(c, "ascending") for c in columns])
    return table[id_column].take(indices).combine_chunks()


def _greedy_keep_earliest(
    num_rows: int, earlier_neighbours: dict[int, list[int]]
) -> dict[int, int]:
    """rank -> rank of the earliest kept neighbour, for every duplicate rank.

    `earlier_neighbours[i]` lists ranks j < i within the distance threshold of i. Visiting ranks
    in order, i is a duplicate of the smallest j that was itself kept.
    """
    dup_of: dict[int, int] = {}
    for i in range(num_rows):
        kept = [j for j in earlier_neighbours.get(i, ()) if j not in dup_of]
        if kept:
            dup_of[i] = min(kept)
    return dup_of


# ----------------------------------------------------------------------------------------------
# Exact search (small tables)


def _exact_neighbours(embeddings: np.ndarray, max_cosine_distance: float) -> dict[int, list[int]]:
    """For each rank i, the earlier ranks j < i within the distance, by blocked exact products."""
    n = len(embeddings)
    min_cosine = 1.0 - max_cosine_distance
    block = max(1, (1 << 24) // max(n, 1))  # keep each (block, n) similarity slab ~64 MB
    neighbours: dict[int, list[int]] = {}
    for start in range(0, n, block):
        stop = min(n, start + block)
        sims = embeddings[start:stop] @ embeddings[:stop].T  # (b, stop)
        rows, cols = np.nonzero(sims >= min_cosine)
        for r, c in zip(rows.tolist(), cols.tolist()):
            i = start + r
            if c < i:
                neighbours.setdefault(i, []).append(c)
    return neighbours


# ----------------------------------------------------------------------------------------------
# Indexed search (large tables)


def _pq_sub_vectors(dim: int) -> int:
    """PQ sub-vectors: ~8 dims each (Lance's usual choice), and it must divide `dim`."""
    for width in (8, 4, 16, 2, 1):
        if dim % width == 0:
            return dim // width
    return 1


def ensure_vector_index(
    dataset: lance.LanceDataset, embedding_column: str = "clip_embedding"
) -> lance.LanceDataset:
    """The dataset with an IVF_PQ cosine index on `embedding_column`, building one if missing."""
    for index in dataset.describe_indices():
        if embedding_column in index.field_names:
            return dataset
    num_rows = dataset.count_rows(filter=f"{embedding_column} IS NOT NULL")
    dim = dataset.schema.field(embedding_column).type.list_size
    # sqrt(N) partitions is the usual IVF balance between probe cost and partition size.
    num_partitions = max(1, min(4096, round(math.sqrt(num_rows))))
    dataset.create_index(
        embedding_column,
        index_type="IVF_PQ",
        metric="cosine",
        num_partitions=num_partitions,
        num_sub_vectors=_pq_sub_vectors(dim),
    )
    return lance.dataset(dataset.uri)


def _indexed_neighbours(
    dataset: lance.LanceDataset,
    rank_of: dict[str, int],
    id_column: str,
    embedding_column: str,
    cfg: DedupConfig,
) -> dict[int, list[int]]:
    """Earlier-ranked neighbours within the distance, one index query per clip, streamed."""
    neighbours: dict[int, list[int]] = {}
    batches = dataset.to_batches(
        columns=[id_column, embedding_column],
        filter=f"{embedding_column} IS NOT NULL",
        batch_size=1024,
    )
    for batch in batches:
        ids = batch.column(id_column).to_pylist()
        vectors = batch.column(embedding_column).flatten().to_numpy(zero_copy_only=False)
        vectors = vectors.reshape(len(ids), -1)
        for clip_id, vector in zip(ids, vectors):
            found = dataset.to_table(
                nearest={
                    "column": embedding_column,
                    "q": vector,
                    "k": cfg.num_neighbors + 1,  # +1: the clip finds itself
                    "metric": "cosine",
                    "nprobes": cfg.nprobes,
                    "refine_factor": cfg.refine_factor,
                },
                columns=[id_column, "_distance"],
            )
            i = rank_of[clip_id]
            for other, distance in zip(
                found[id_column].to_pylist(), found["_distance"].to_pylist()
            ):
                j = rank_of.get(other)
                if j is not None and j < i and distance <= cfg.max_cosine_distance:
                    neighbours.setdefault(i, []).append(j)
    return neighbours


# ----------------------------------------------------------------------------------------------
# The stage


def find_duplicates(
    dataset: lance.LanceDataset,
    max_cosine_distance: float,
    *,
    cfg: DedupConfig | None = None,
    id_column: str = "clip_id",
    embedding_column: str = "clip_embedding",
    order_columns: Sequence[str] = ("uri", "start_frame"),
) -> dict[str, str]:
    """{duplicate clip_id: kept clip_id it duplicates}; clips absent from the dict are kept.

    `max_cosine_distance` overrides `cfg.max_cosine_distance`; the rest of `cfg` chooses exact
    vs. indexed search (see the module docstring). Rows without an embedding are ignored.
    """
    cfg = DedupConfig(
        **{**(cfg or DedupConfig()).__dict__, "max_cosine_distance": max_cosine_distance}
    )
    ordered_ids = _stable_order(dataset, id_column, order_columns, embedding_column).to_pylist()
    rank_of = {clip_id: rank for rank, clip_id in enumerate(ordered_ids)}
    if len(rank_of) != len(ordered_ids):
        raise ValueError(f"find_duplicates: {id_column} values are not unique")

    if len(ordered_ids) < cfg.index_min_rows:
        table = dataset.to_table(
            columns=[id_column, embedding_column], filter=f"{embedding_column} IS NOT NULL"
        )
        vectors = table[embedding_column].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors = normalize_rows(vectors.reshape(table.num_rows, -1))
        ranks = np.array([rank_of[c] for c in table[id_column].to_pylist()], dtype=np.int64)
        by_rank = np.empty_like(vectors)
        by_rank[ranks] = vectors
        neighbours = _exact_neighbours(by_rank, cfg.max_cosine_distance)
    else:
        dataset = ensure_vector_index(dataset, embedding_column)
        neighbours = _indexed_neighbours(dataset, rank_of, id_column, embedding_column, cfg)

    dup_ranks = _greedy_keep_earliest(len(ordered_ids), neighbours)
    return {ordered_ids[i]: ordered_ids[j] for i, j in dup_ranks.items()}


class DedupStage(Stage):
    """The `dedup` stage: one pass over the whole clips table after curation. Reads
    `clip_embedding`; writes `dup_of` (the kept clip this one duplicates, null when kept) and
    `dedup_provenance`."""

    name: ClassVar[str] = "dedup"
    runs_on: ClassVar[str] = "table"
    reads: ClassVar[tuple[str, ...]] = ("clip_embedding",)
    sections: ClassVar[dict[str, type]] = {"dedup": DedupConfig}

    @classmethod
    def output_schema(cls, cfg: Any) -> pa.Schema:
        return pa.schema([("dup_of", pa.string()), ("dedup_provenance", pa.string())])

    def run_table(self, db: Any) -> int:
        """Set `dup_of` on every clip of `db` (a `data_engine.store.Database`); returns the
        number of duplicates."""
        from data_engine import store as st

        table = db.table(st.CLIPS)
        if "clip_embedding" not in table.schema.names:
            raise StageError(
                "--stages dedup: the clips have no clip_embedding (run the embedding stage)"
            )
        cfg: DedupConfig = self.cfg.dedup
        duplicates = find_duplicates(table, cfg.max_cosine_distance, cfg=cfg)
        ids = table.to_table(columns=["clip_id"]).column("clip_id").to_pylist()
        provenance = json.dumps(
            {"method": "greedy keep-earliest by (uri, start_frame)", **cfg.__dict__},
            sort_keys=True,
        )
        updates = pa.table(
            {
                "clip_id": pa.array(ids, pa.string()),
                "dup_of": pa.array([duplicates.get(i) for i in ids], pa.string()),
                "dedup_provenance": pa.array([provenance] * len(ids), pa.string()),
            }
        )
        missing = [f for f in self.output_schema(self.cfg) if f.name not in table.schema.names]
        if missing:
            table.add_columns(pa.schema(missing))
        db.table(st.CLIPS).merge_insert("clip_id").when_matched_update_all().execute(updates)
        return len(duplicates)
