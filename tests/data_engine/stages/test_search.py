"""Semantic text search over clip embeddings, with the model named by the provenance."""

from __future__ import annotations

import json

import lance
import numpy as np
import pyarrow as pa
import pytest
from stage_helpers import make_clip, textured_frame

from data_engine.stages.base import StageError
from data_engine.stages.clip_model import encode_texts, load_clip_from_config
from data_engine.stages.embedding import EmbeddingConfig, EmbeddingScorer
from data_engine.stages.search import text_search
from demos.tiny_models import make_tiny_open_clip

QUERY = "a dog running on a beach"


@pytest.fixture(scope="module")
def clips_table(tiny_clip_cfg, tmp_path_factory) -> lance.LanceDataset:
    """Eight clips embedded by the real scorer, plus one planted clip whose embedding is the
    query's own text embedding (so it is the nearest by construction, for any weights)."""
    scorer = EmbeddingScorer(EmbeddingConfig(clip=tiny_clip_cfg, num_frames=2))
    rows = scorer.score_clips([make_clip(np.stack([textured_frame(s)] * 2)) for s in range(8)])
    model, _, tokenizer, _ = load_clip_from_config(tiny_clip_cfg, "x")
    planted = dict(rows[0], clip_embedding=encode_texts(model, tokenizer, [QUERY])[0].tolist())
    rows = [planted, *rows]
    table = pa.Table.from_pylist(rows, schema=scorer.output_schema)
    table = table.append_column("clip_id", pa.array([f"c{i}" for i in range(len(rows))]))
    table = table.append_column("motion_score", pa.array([float(i) for i in range(len(rows))]))
    return lance.write_dataset(table, str(tmp_path_factory.mktemp("db") / "clips.lance"))


def test_nearest_clip_comes_first(clips_table):
    """Ranking is by text-clip cosine similarity, best first, using the recorded model."""
    result = text_search(clips_table, QUERY, limit=5)
    assert result.num_rows == 5
    assert result["clip_id"][0].as_py() == "c0"
    assert result["similarity"][0].as_py() == pytest.approx(1.0, abs=1e-4)
    sims = result["similarity"].to_pylist()
    assert sims == sorted(sims, reverse=True)
    assert "clip_embedding" not in result.column_names


def test_where_filter_combines_with_ranking(clips_table):
    """--where prefilters: the planted clip (motion 0) is excluded, every row passes the filter,
    and `limit` rows still come back."""
    result = text_search(clips_table, QUERY, where="motion_score >= 3", limit=4)
    assert result.num_rows == 4
    assert "c0" not in result["clip_id"].to_pylist()
    assert all(m >= 3 for m in result["motion_score"].to_pylist())


def test_other_checkpoint_is_refused(clips_table, tmp_path):
    """Text must be encoded by the same weights as the clips: a checkpoint with another hash
    (here seed 1) is rejected, naming the key, instead of returning a random ranking."""
    _, other, config = make_tiny_open_clip(tmp_path, seed=1)
    with pytest.raises(
        StageError, match=r"embedding\.clip\.checkpoint_path: .* is not the checkpoint"
    ):
        text_search(
            clips_table, QUERY, {"checkpoint_path": str(other), "model_config_path": str(config)}
        )


def test_provenance_names_the_model(clips_table):
    """The provenance column is what `stiv query --text` reads to pick the model."""
    prov = json.loads(clips_table.to_table(columns=["embedding_provenance"])[0][0].as_py())
    assert prov["clip"]["model_name"] == "stiv-tiny-clip"
