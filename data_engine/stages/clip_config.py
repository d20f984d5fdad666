"""What a CLIP-based stage's config needs without loading torch or open_clip: the model
settings, weight-file checks and provenance, and small numpy helpers shared by those stages
(`clip_model` holds the loader and encoders, imported only when a stage starts)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_engine.stages.base import StageError

SEEDED_TEST_WEIGHTS_KEY = "stiv_seeded_test_weights"
"""safetensors metadata key written by `demos.tiny_models`: its value "true" marks random test weights."""


@dataclass
class ClipModelConfig:
    """Which open_clip model a stage runs, and where its weights live (all local files)."""

    model_name: str = (
        "ViT-L-14"  # open_clip architecture name (bundled config or model_config_path's stem)
    )
    checkpoint_path: str = (
        ""  # local open_clip checkpoint (.safetensors/.bin/.pt); required at stage start
    )
    model_config_path: str = (
        ""  # optional JSON architecture config for a custom model ("" = bundled)
    )
    device: str = "cpu"  # torch device the model runs on ("cpu", "cuda", "cuda:1")
    batch_size: int = 32  # frames per forward pass (frames)

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("clip.model_name: must not be empty")
        if self.batch_size < 1:
            raise ValueError(f"clip.batch_size: must be >= 1, got {self.batch_size}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"clip.device: expected 'cpu' or 'cuda[:N]', got {self.device!r}")


def file_sha256_16(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """First 16 hex digits of a file's sha256 (streamed, so a 1.7 GB ViT-L-14 stays out of RAM)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def is_seeded_test_checkpoint(path: str | Path) -> bool:
    """True when `demos.tiny_models` wrote this file (its safetensors metadata says so)."""
    if not str(path).endswith(".safetensors"):
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return metadata.get(SEEDED_TEST_WEIGHTS_KEY) == "true"


def checkpoint_provenance(path: str | Path) -> dict[str, Any]:
    """Path, size, hash and test-weights flag of one weights file, for a provenance column."""
    path = Path(path)
    return {
        "checkpoint_path": str(path.resolve()),
        "checkpoint_bytes": path.stat().st_size,
        "checkpoint_sha256": file_sha256_16(path),
        "seeded_test_weights": is_seeded_test_checkpoint(path),
    }


def require_file(path: str, key: str) -> Path:
    """The path as a Path, or StageError naming the config `key` that sets it."""
    if not path:
        raise StageError(f"{key}: not set (point it at a local weights file)")
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise StageError(f"{key}: file not found: {resolved}")
    return resolved


def clip_embed_dim(model_name: str, model_config_path: str = "") -> int:
    """Output embedding size of an open_clip architecture, read from its config (no weights)."""
    if model_config_path:
        return int(json.loads(Path(model_config_path).read_text())["embed_dim"])
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise StageError(f"unknown open_clip model {model_name!r}")
    return int(cfg["embed_dim"])


def normalize_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def require_clip_weights(clip: ClipModelConfig, key: str) -> None:
    """StageError naming `key.checkpoint_path` (or `key.model_config_path`) when a CLIP
    stage's weight files are missing: the start-up check of every CLIP-based stage."""
    require_file(clip.checkpoint_path, f"{key}.checkpoint_path")
    if clip.model_config_path:
        require_file(clip.model_config_path, f"{key}.model_config_path")
