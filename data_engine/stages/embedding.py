"""CLIP clip embedding and temporal consistency from the same per-frame embeddings.

Reads a clip's sampled frames; writes `clip_embedding` (unit-norm mean of the per-frame
embeddings, a fixed-size float32 list so Lance can index it), `temporal_consistency` (mean
cosine similarity of consecutive sampled frames) and `embedding_provenance`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from data_engine.stages.clip_config import (
    ClipModelConfig,
    clip_embed_dim,
    normalize_rows,
)
from data_engine.stages.clip_stage import ClipScorer, ClipStage


@dataclass
class EmbeddingConfig:
    """Settings of the `embedding` stage."""

    clip: ClipModelConfig = field(
        default_factory=ClipModelConfig
    )  # image encoder; `stiv query --text` reuses it
    num_frames: int = 8  # frames per clip embedded, evenly spread over the sampled ones (0 = all)

    def __post_init__(self) -> None:
        if isinstance(self.clip, dict):
            self.clip = ClipModelConfig(**self.clip)
        if self.num_frames < 0:
            raise ValueError(f"embedding.num_frames: must be >= 0, got {self.num_frames}")
        if self.num_frames == 1:
            raise ValueError(
                "embedding.num_frames: 1 frame leaves temporal_consistency undefined; use >= 2"
            )


def clip_embedding_of(frame_embeddings: np.ndarray) -> np.ndarray:
    """(K, D) unit-norm frame embeddings -> (D,) unit-norm clip embedding (re-normalised mean)."""
    return normalize_rows(frame_embeddings.mean(axis=0, keepdims=True))[0]


def temporal_consistency_of(frame_embeddings: np.ndarray) -> float | None:
    """Mean cosine similarity of consecutive frames; None for fewer than 2 frames (undefined).

    1.0 for a static shot; drops when the content jumps (a cut inside the clip, a flash).
    """
    if len(frame_embeddings) < 2:
        return None
    cosines = np.sum(frame_embeddings[1:] * frame_embeddings[:-1], axis=1)  # (K-1,)
    return float(np.mean(cosines))


def embedding_schema(embed_dim: int) -> pa.Schema:
    """Output columns for a `embed_dim`-wide CLIP model (fixed-size list: Lance vector index)."""
    return pa.schema(
        [
            ("clip_embedding", pa.list_(pa.float32(), embed_dim)),
            ("temporal_consistency", pa.float32()),
            ("embedding_provenance", pa.string()),
        ]
    )


class EmbeddingScorer(ClipScorer):
    """Reads sampled frames; writes `clip_embedding`, `temporal_consistency` and provenance.

    The class-level `output_schema` has a variable-length embedding list because the width
    depends on the model; an instance's `output_schema` has the fixed width of its model
    (`embedding_schema(clip_embed_dim(...))` gives it without loading weights).
    """

    name: ClassVar[str] = "embedding"
    output_schema: pa.Schema = pa.schema(
        [
            ("clip_embedding", pa.list_(pa.float32())),
            ("temporal_consistency", pa.float32()),
            ("embedding_provenance", pa.string()),
        ]
    )

    def __init__(self, cfg: EmbeddingConfig) -> None:
        from data_engine.stages.clip_model import load_clip_from_config

        self.cfg = cfg
        self.model, self.preprocess, _, clip_provenance = load_clip_from_config(
            cfg.clip, "embedding.clip"
        )
        self.embed_dim = int(self.model.visual.output_dim)
        self.output_schema = embedding_schema(self.embed_dim)
        self.set_provenance(
            {
                "clip": clip_provenance,
                "num_frames": cfg.num_frames,
                "clip_embedding": "L2-normalised mean of L2-normalised frame embeddings",
                "temporal_consistency": "mean cosine of consecutive sampled frames",
                "seeded_test_weights": clip_provenance["seeded_test_weights"],
            }
        )

    def score_embeddings(self, embeddings: np.ndarray) -> dict[str, Any]:
        return {
            "clip_embedding": clip_embedding_of(embeddings).tolist(),
            "temporal_consistency": temporal_consistency_of(embeddings),
            "embedding_provenance": self.provenance_json,
        }


class EmbeddingStage(ClipStage):
    """The `embedding` stage: clip_embedding (mean CLIP frame embedding) and temporal_consistency."""

    name: ClassVar[str] = "embedding"
    scorer_class: ClassVar[type[ClipScorer]] = EmbeddingScorer
    sections: ClassVar[dict[str, type]] = {"embedding": EmbeddingConfig}

    @classmethod
    def output_schema(cls, cfg: Any) -> pa.Schema:
        return embedding_schema(
            clip_embed_dim(cfg.embedding.clip.model_name, cfg.embedding.clip.model_config_path)
        )
