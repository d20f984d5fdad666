"""Aesthetic score: CLIP image embedding -> LAION improved-aesthetic-predictor MLP -> 1..10.

Reads a clip's sampled frames; writes `aesthetic_score` (mean over `num_frames` evenly spread
frames) and `aesthetic_provenance`. The head reproduces the public predictor
(christophschuhmann/improved-aesthetic-predictor, `simple_inference.py`) layer for layer, so its
published `sac+logos+ava1-l14-linearMSE.pth` (trained on ViT-L/14 embeddings, 768-d) loads as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from data_engine.stages.base import StageError
from data_engine.stages.clip_config import (
    ClipModelConfig,
    checkpoint_provenance,
    require_file,
)
from data_engine.stages.clip_stage import ClipScorer, ClipStage


@dataclass
class AestheticConfig:
    """Settings of the `aesthetic` stage."""

    clip: ClipModelConfig = field(
        default_factory=ClipModelConfig
    )  # image encoder (ViT-L-14 for the LAION head)
    head_path: str = (
        ""  # local LAION aesthetic head state dict (.pth or .safetensors); required at start
    )
    num_frames: int = 4  # frames per clip scored, evenly spread over the sampled ones (0 = all)

    def __post_init__(self) -> None:
        if isinstance(self.clip, dict):
            self.clip = ClipModelConfig(**self.clip)
        if self.num_frames < 0:
            raise ValueError(f"aesthetic.num_frames: must be >= 0, got {self.num_frames}")


def load_aesthetic_head(path: str, input_dim: int, key: str = "aesthetic.head_path") -> Any:
    """Load a head state dict (published .pth or our .safetensors) for `input_dim` embeddings
    as a `clip_model.AestheticHead`."""
    import torch
    from safetensors.torch import load_file

    from data_engine.stages.clip_model import AestheticHead

    head_file = require_file(path, key)
    if head_file.suffix == ".safetensors":
        state = load_file(str(head_file))
    else:
        state = torch.load(head_file, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    first = state.get("layers.0.weight")
    if first is None:
        raise StageError(f"{key}: {head_file} is not a LAION aesthetic head (no layers.0.weight)")
    if first.shape[1] != input_dim:
        raise StageError(
            f"{key}: head expects {first.shape[1]}-d embeddings but the CLIP model gives "
            f"{input_dim}-d (the published head needs ViT-L-14)"
        )
    head = AestheticHead(input_dim)
    head.load_state_dict(state, strict=True)
    return head.eval()


class AestheticScorer(ClipScorer):
    """Reads sampled frames; writes `aesthetic_score` (mean over frames) and its provenance."""

    name: ClassVar[str] = "aesthetic"
    output_schema: ClassVar[pa.Schema] = pa.schema(
        [("aesthetic_score", pa.float32()), ("aesthetic_provenance", pa.string())]
    )

    def __init__(self, cfg: AestheticConfig) -> None:
        from data_engine.stages.clip_model import load_clip_from_config

        self.cfg = cfg
        self.model, self.preprocess, _, clip_provenance = load_clip_from_config(
            cfg.clip, "aesthetic.clip"
        )
        embed_dim = int(self.model.visual.output_dim)
        self.head = load_aesthetic_head(cfg.head_path, embed_dim).to(cfg.clip.device)
        head_provenance = checkpoint_provenance(cfg.head_path)
        self.set_provenance(
            {
                "clip": clip_provenance,
                "head": head_provenance,
                "num_frames": cfg.num_frames,
                "frame_aggregation": "mean",
                "seeded_test_weights": bool(
                    clip_provenance["seeded_test_weights"] or head_provenance["seeded_test_weights"]
                ),
            }
        )

    def score_embeddings(self, embeddings: np.ndarray) -> dict[str, Any]:
        import torch

        x = torch.from_numpy(embeddings).to(self.cfg.clip.device)  # (K, D), already unit norm
        with torch.inference_mode():
            per_frame = self.head(x).float().cpu().numpy()  # (K,)
        return {
            "aesthetic_score": float(np.mean(per_frame)),
            "aesthetic_provenance": self.provenance_json,
        }


class AestheticStage(ClipStage):
    """The `aesthetic` stage: aesthetic_score, the LAION head on CLIP ViT-L-14 frame embeddings."""

    name: ClassVar[str] = "aesthetic"
    scorer_class: ClassVar[type[ClipScorer]] = AestheticScorer
    sections: ClassVar[dict[str, type]] = {"aesthetic": AestheticConfig}

    @classmethod
    def output_schema(cls, cfg: Any) -> pa.Schema:
        return AestheticScorer.output_schema

    @classmethod
    def check_ready(cls, cfg: Any) -> None:
        super().check_ready(cfg)
        require_file(cfg.aesthetic.head_path, "aesthetic.head_path")
