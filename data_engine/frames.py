"""Frames sampled once per clip and shared by every scorer.

A clip's sampled frames travel between Ray Data stages as raw bytes plus a shape (Ray's
variable-shape tensor columns are avoided on purpose: clips of different videos have different
sizes, and bytes + shape round-trip through Arrow and Lance without surprises).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClipFrames:
    """Frames sampled from one clip, RGB uint8, in display orientation (rotation applied).

    frames:        (K, H, W, 3) uint8 RGB at the sampling working resolution
    times_s:       (K,) presentation time of each frame in seconds from the start of the video
    pair_frames:   (K, H, W, 3) uint8 RGB, the frame `motion_gap_frames` after each sampled
                   frame (for optical flow); may be empty (0, H, W, 3) when not sampled
    pair_dt_s:     seconds between each sampled frame and its pair (K,)
    """

    frames: np.ndarray
    times_s: np.ndarray
    pair_frames: np.ndarray
    pair_dt_s: np.ndarray


def pack_frames(frames: np.ndarray) -> tuple[bytes, list[int]]:
    """(K, H, W, 3) uint8 -> (raw bytes, shape) for an Arrow binary column."""
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    return frames.tobytes(), list(frames.shape)


def unpack_frames(raw: bytes, shape: list[int] | np.ndarray) -> np.ndarray:
    """Inverse of `pack_frames`."""
    return np.frombuffer(raw, dtype=np.uint8).reshape([int(s) for s in shape])


def even_frame_indices(num_available: int, num_wanted: int) -> np.ndarray:
    """Indices of `num_wanted` frames spread evenly from the first to the last of
    `num_available` (all of them when `num_wanted` is 0 or at least `num_available`). The one
    frame picker of the scorers, captioner and DSG checker."""
    if num_wanted <= 0 or num_wanted >= num_available:
        return np.arange(num_available)
    return np.unique(np.round(np.linspace(0, num_available - 1, num_wanted)).astype(np.int64))
