"""What the CLIP frame-embedding stages (aesthetic, category, embedding) share: the scorer's
loop over each clip's frame embeddings with its provenance, and the stage wiring (weights
checked before any work, one scorer per actor, a batched forward pass per batch).

Torch-free at import, like every stage module: loading a curation config imports this."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import numpy as np

from data_engine.frames import ClipFrames
from data_engine.stages.base import ClipInput, Stage, score_frames_or_each
from data_engine.stages.clip_config import require_clip_weights


class ClipScorer:
    """Base of a scorer reading CLIP embeddings of a clip's sampled frames. A subclass loads
    `model` and `preprocess` (`clip_model.load_clip_from_config`), calls `set_provenance` once,
    and writes one clip's columns in `score_embeddings`."""

    name: ClassVar[str]  # the stage's name, used in per-clip errors
    cfg: Any  # the stage's section: `clip` (ClipModelConfig) and `num_frames`
    model: Any
    preprocess: Any

    def set_provenance(self, provenance: dict[str, Any]) -> None:
        self._provenance = provenance
        self.provenance_json = json.dumps(provenance, sort_keys=True)  # the column's value

    def provenance(self) -> dict[str, Any]:
        return self._provenance

    def score_embeddings(self, embeddings: np.ndarray) -> dict[str, Any]:
        """One clip's output columns from its (K, D) unit-norm frame embeddings (K >= 1)."""
        raise NotImplementedError(f"{type(self).__name__}.score_embeddings")

    def score_clips(self, clips: list[ClipFrames]) -> list[dict[str, Any]]:
        from data_engine.stages.clip_model import encode_clips

        embeddings = encode_clips(
            self.model, self.preprocess, clips, self.cfg.num_frames, self.cfg.clip.batch_size
        )
        return [
            self.score_embeddings(emb)
            if len(emb)
            else {"error": f"{self.name}: clip has no sampled frames"}
            for emb in embeddings
        ]


class ClipStage(Stage):
    """A stage run by a `ClipScorer` on an actor pool; its YAML section is named like the stage
    and holds the `clip` model settings."""

    runs_on: ClassVar[str] = "actor"
    scorer_class: ClassVar[type[ClipScorer]]

    @classmethod
    def check_ready(cls, cfg: Any) -> None:
        require_clip_weights(getattr(cfg, cls.name).clip, f"{cls.name}.clip")

    def setup(self) -> None:
        self.scorer = self.scorer_class(getattr(self.cfg, self.name))

    def __call__(self, batch: list[ClipInput]) -> list[dict[str, Any]]:
        return score_frames_or_each(batch, self.scorer.score_clips)
