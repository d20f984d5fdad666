"""Semantic search: rank clips by CLIP text-to-clip similarity, combined with SQL filters.

The text is encoded by the very model that produced `clip_embedding`, found through the
`embedding_provenance` column: comparing a text embedding with image embeddings of another
model would rank at random. The checkpoint's hash is checked against the provenance.
"""

from __future__ import annotations

import json
from typing import Any

import lance
import pyarrow as pa
import pyarrow.compute as pc

from data_engine.stages.base import StageError
from data_engine.stages.clip_model import encode_texts, load_open_clip

PROVENANCE_COLUMN = "embedding_provenance"


def embedding_model_provenance(dataset: lance.LanceDataset) -> dict[str, Any]:
    """The CLIP provenance (model name, checkpoint, hash) shared by every `clip_embedding`."""
    if PROVENANCE_COLUMN not in dataset.schema.names:
        raise StageError("clips table has no embedding_provenance: run the `embedding` stage first")
    values = dataset.to_table(
        columns=[PROVENANCE_COLUMN], filter=f"{PROVENANCE_COLUMN} IS NOT NULL"
    )[PROVENANCE_COLUMN]
    distinct = pc.unique(values).to_pylist()
    if not distinct:
        raise StageError("no clip has a clip_embedding yet: run the `embedding` stage first")
    models = {json.dumps(json.loads(p)["clip"], sort_keys=True) for p in distinct}
    if len(models) > 1:
        # Embeddings of two models live in different spaces; one query cannot rank both.
        raise StageError(
            f"clip_embedding was written by {len(models)} different CLIP models; "
            "re-run the `embedding` stage so all clips use one"
        )
    return json.loads(models.pop())


def text_search(
    dataset: lance.LanceDataset,
    text: str,
    clip_model_loader_args: dict[str, Any] | None = None,
    where: str | None = None,
    limit: int = 10,
    columns: list[str] | None = None,
) -> pa.Table:
    """Clips ranked by cosine similarity of `clip_embedding` to the CLIP embedding of `text`.

    clip_model_loader_args: overrides for `load_open_clip` when the weights moved since the
      embeddings were written ("checkpoint_path", "model_config_path", "device"); by default
      the paths recorded in the provenance are used. The checkpoint must hash the same.
    where: Lance SQL filter applied before the vector search (prefilter), so `limit` rows
      that pass the filter come back.
    Returns the requested `columns` (default: every column but the embedding) plus
    `_distance` (cosine distance) and `similarity` (1 - distance), best first.
    """
    if limit < 1:
        raise ValueError(f"limit: must be >= 1, got {limit}")
    recorded = embedding_model_provenance(dataset)
    args = {
        "checkpoint_path": recorded["checkpoint_path"],
        "model_config_path": recorded.get("model_config_path", ""),
        "device": "cpu",
        **(clip_model_loader_args or {}),
    }
    model, _, tokenizer, loaded = load_open_clip(
        recorded["model_name"], config_key="embedding.clip", **args
    )
    if loaded["checkpoint_sha256"] != recorded["checkpoint_sha256"]:
        raise StageError(
            f"embedding.clip.checkpoint_path: {loaded['checkpoint_path']} (sha256 "
            f"{loaded['checkpoint_sha256']}) is not the checkpoint that wrote clip_embedding "
            f"(sha256 {recorded['checkpoint_sha256']})"
        )
    query = encode_texts(model, tokenizer, [text])[0]
    if columns is None:
        columns = [c for c in dataset.schema.names if c != "clip_embedding"]
    result = dataset.to_table(
        columns=[*columns, "_distance"],
        nearest={"column": "clip_embedding", "q": query, "k": limit, "metric": "cosine"},
        filter=where,
        prefilter=where is not None,
    )
    similarity = pc.subtract(pa.scalar(1.0, pa.float32()), result["_distance"])
    return result.append_column("similarity", similarity)
