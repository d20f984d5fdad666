"""Frame builders shared by the stage tests (a plain module: conftest names collide)."""

from __future__ import annotations

import cv2
import numpy as np

from data_engine.frames import ClipFrames


def make_clip(frames: np.ndarray) -> ClipFrames:
    """ClipFrames from a (K, H, W, 3) stack, one frame per second, no motion pairs."""
    k, h, w, _ = frames.shape
    return ClipFrames(
        frames=frames,
        times_s=np.arange(k, dtype=np.float64),
        pair_frames=np.zeros((0, h, w, 3), np.uint8),
        pair_dt_s=np.zeros(0),
    )


def textured_frame(seed: int, height: int = 180, width: int = 320) -> np.ndarray:
    """A smooth random colour texture (low-frequency, like real images), (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8).astype(np.float32)
    return (
        cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        .clip(0, 255)
        .astype(np.uint8)
    )
