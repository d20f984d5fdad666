"""CLIP clip embeddings and temporal consistency."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from stage_helpers import make_clip, textured_frame

from data_engine.stages.embedding import (
    EmbeddingConfig,
    EmbeddingScorer,
    embedding_schema,
    temporal_consistency_of,
)


@pytest.fixture(scope="module")
def scorer(tiny_clip_cfg) -> EmbeddingScorer:
    return EmbeddingScorer(EmbeddingConfig(clip=tiny_clip_cfg, num_frames=8))


def test_identical_frames_give_consistency_one(scorer):
    """Holds for any encoder: equal frames have equal embeddings, cosine 1."""
    frames = np.stack([textured_frame(4)] * 6)
    row = scorer.score_clips([make_clip(frames)])[0]
    assert row["temporal_consistency"] == pytest.approx(1.0, abs=1e-5)


def test_spliced_clip_is_less_consistent_than_a_steady_one(scorer):
    """A cut inside a clip (half one scene, half another) must lower the score."""
    a, b = textured_frame(10), textured_frame(11)
    rng = np.random.default_rng(0)
    noise = lambda f: np.clip(f + rng.integers(-3, 4, f.shape), 0, 255).astype(np.uint8)  # noqa: E731
    steady = np.stack([noise(a) for _ in range(8)])
    spliced = np.stack([noise(a) for _ in range(4)] + [noise(b) for _ in range(4)])
    rows = scorer.score_clips([make_clip(steady), make_clip(spliced)])
    assert rows[1]["temporal_consistency"] < rows[0]["temporal_consistency"] - 1e-3


def test_embedding_is_the_renormalised_mean_and_fits_the_fixed_schema(scorer):
    """clip_embedding is unit norm, model-width, and writes into the fixed-size list column
    Lance's vector index needs."""
    frames = np.stack([textured_frame(s) for s in range(4)])
    row = scorer.score_clips([make_clip(frames)])[0]
    vec = np.asarray(row["clip_embedding"], np.float32)
    assert vec.shape == (32,)
    assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    assert scorer.output_schema == embedding_schema(32)
    table = pa.Table.from_pylist([row], schema=scorer.output_schema)
    assert table.schema.field("clip_embedding").type == pa.list_(pa.float32(), 32)
    prov = json.loads(row["embedding_provenance"])
    assert prov["clip"]["checkpoint_sha256"] and prov["seeded_test_weights"] is True


def test_single_frame_consistency_is_undefined_not_one():
    """One frame cannot show consistency; report null instead of a flattering 1.0."""
    assert temporal_consistency_of(np.ones((1, 4), np.float32) / 2) is None
    with pytest.raises(ValueError, match=r"embedding\.num_frames"):
        EmbeddingConfig(num_frames=1)
