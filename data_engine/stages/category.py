"""Zero-shot category: CLIP similarity between a clip and one text prompt per label.

Reads a clip's sampled frames; writes `category` (the best label), `category_score` (its softmax
probability over all labels, CLIP's learned temperature, in 0..1) and `category_provenance`.
The prompt embeddings are computed once at start (Radford et al. 2021, sec. 3.1.4: a prompt
template such as "a photo of {}." beats the bare label).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from data_engine.stages.clip_config import (
    ClipModelConfig,
    normalize_rows,
)
from data_engine.stages.clip_stage import ClipScorer, ClipStage

DEFAULT_LABELS = [
    "people",
    "animals",
    "nature and landscapes",
    "city and streets",
    "vehicles",
    "sports",
    "food and cooking",
    "indoor rooms",
    "screens and text",
    "cartoon or animation",
    "video game",
]


@dataclass
class CategoryConfig:
    """Settings of the `category` stage."""

    clip: ClipModelConfig = field(default_factory=ClipModelConfig)  # image + text encoder
    labels: list[str] = field(default_factory=lambda: list(DEFAULT_LABELS))  # candidate categories
    prompt_template: str = (
        "a video frame of {}."  # text prompt per label; "{}" is replaced by the label
    )
    num_frames: int = 4  # frames per clip averaged before matching (0 = all sampled frames)

    def __post_init__(self) -> None:
        if isinstance(self.clip, dict):
            self.clip = ClipModelConfig(**self.clip)
        if len(self.labels) < 2:
            raise ValueError("category.labels: need at least 2 labels to choose between")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("category.labels: labels must be unique")
        if "{}" not in self.prompt_template:
            raise ValueError("category.prompt_template: must contain '{}' where the label goes")
        if self.num_frames < 0:
            raise ValueError(f"category.num_frames: must be >= 0, got {self.num_frames}")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class CategoryScorer(ClipScorer):
    """Reads sampled frames; writes `category`, `category_score` and provenance."""

    name: ClassVar[str] = "category"
    output_schema: ClassVar[pa.Schema] = pa.schema(
        [
            ("category", pa.string()),
            ("category_score", pa.float32()),
            ("category_provenance", pa.string()),
        ]
    )

    def __init__(self, cfg: CategoryConfig) -> None:
        from data_engine.stages.clip_model import (
            encode_texts,
            load_clip_from_config,
            logit_scale_of,
        )

        self.cfg = cfg
        self.model, self.preprocess, tokenizer, clip_provenance = load_clip_from_config(
            cfg.clip, "category.clip"
        )
        prompts = [cfg.prompt_template.format(label) for label in cfg.labels]
        self.label_embeddings = encode_texts(self.model, tokenizer, prompts)  # (L, D)
        self.logit_scale = logit_scale_of(self.model)
        self.set_provenance(
            {
                "clip": clip_provenance,
                "labels": list(cfg.labels),
                "prompt_template": cfg.prompt_template,
                "num_frames": cfg.num_frames,
                "score": "softmax over labels of logit_scale * cosine(mean frame embedding, prompt)",
                "seeded_test_weights": clip_provenance["seeded_test_weights"],
            }
        )

    def score_embeddings(self, embeddings: np.ndarray) -> dict[str, Any]:
        clip_vec = normalize_rows(embeddings.mean(axis=0, keepdims=True))  # (1, D)
        probs = softmax(self.logit_scale * clip_vec @ self.label_embeddings.T)[0]  # (L,)
        best = int(np.argmax(probs))
        return {
            "category": self.cfg.labels[best],
            "category_score": float(probs[best]),
            "category_provenance": self.provenance_json,
        }


class CategoryStage(ClipStage):
    """The `category` stage: the CLIP zero-shot label of each clip."""

    name: ClassVar[str] = "category"
    scorer_class: ClassVar[type[ClipScorer]] = CategoryScorer
    sections: ClassVar[dict[str, type]] = {"category": CategoryConfig}

    @classmethod
    def output_schema(cls, cfg: Any) -> pa.Schema:
        return CategoryScorer.output_schema
