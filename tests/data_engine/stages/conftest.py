"""Tiny seeded CLIP + aesthetic head written once per session and loaded like real weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_engine.stages.clip_config import ClipModelConfig
from demos.tiny_models import make_tiny_aesthetic_head, make_tiny_open_clip


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_clip")


@pytest.fixture(scope="session")
def tiny_clip_cfg(tiny_clip_dir: Path) -> ClipModelConfig:
    name, checkpoint, config = make_tiny_open_clip(tiny_clip_dir, seed=0)
    return ClipModelConfig(
        model_name=name,
        checkpoint_path=str(checkpoint),
        model_config_path=str(config),
        batch_size=16,
    )


@pytest.fixture(scope="session")
def tiny_head_path(tiny_clip_dir: Path) -> Path:
    return make_tiny_aesthetic_head(tiny_clip_dir / "head.safetensors", embed_dim=32, seed=0)
