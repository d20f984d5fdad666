"""Cheap per-clip scores from the frames sampled once per clip: motion and clarity.

Both work at a fixed working resolution so a score means the same thing for a 4K and a 240p
source: motion is in percent of the frame's short side per second (the unit of
docs/architecture.md "Storage"), clarity is the Laplacian variance of the frame resized to a
fixed short side.
"""

from __future__ import annotations

import cv2
import numpy as np

from data_engine.frames import ClipFrames

MOTION_SHORT_SIDE_PX = 128  # working resolution for optical flow (short side, pixels)
CLARITY_SHORT_SIDE_PX = 256  # working resolution for the Laplacian (short side, pixels)

# Farneback parameters (OpenCV's recommended set): a 3-level pyramid with 15 px windows at
# 128 px follows displacements up to roughly a third of the frame between the two frames.
_FARNEBACK = dict(
    pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0
)


def _grey_at_short_side(rgb: np.ndarray, short_side_px: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (h, w) uint8 grey with min(h, w) == short_side_px, aspect kept."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    height, width = grey.shape
    scale = short_side_px / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # INTER_AREA when shrinking (no aliasing); INTER_LINEAR when a small source is enlarged.
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(grey, size, interpolation=interpolation)


def motion_score(clip: ClipFrames) -> float:
    """Mean dense optical-flow magnitude between each sampled frame and its pair, in percent of
    the frame's short side per second.

    Raises ValueError when the clip has no usable pair (no pair frames, or pairs 0 s apart):
    a missing score must not masquerade as "no motion".
    """
    if len(clip.pair_frames) != len(clip.frames):
        raise ValueError("motion_score: the clip was sampled without pair frames")
    speeds = []
    for frame, pair, dt_s in zip(clip.frames, clip.pair_frames, clip.pair_dt_s):
        if dt_s <= 0:
            continue
        first = _grey_at_short_side(frame, MOTION_SHORT_SIDE_PX)
        second = _grey_at_short_side(pair, MOTION_SHORT_SIDE_PX)
        flow = cv2.calcOpticalFlowFarneback(first, second, None, **_FARNEBACK)  # (h, w, 2) px
        magnitude_px = float(np.linalg.norm(flow, axis=2).mean())
        speeds.append(100.0 * magnitude_px / MOTION_SHORT_SIDE_PX / float(dt_s))
    if not speeds:
        raise ValueError("motion_score: no frame pair with a positive time gap")
    return float(np.mean(speeds))


def clarity_score(clip: ClipFrames) -> float:
    """Variance of the Laplacian of grey frames resized to a fixed short side, averaged over the
    sampled frames (higher = sharper)."""
    if len(clip.frames) == 0:
        raise ValueError("clarity_score: the clip has no sampled frames")
    variances = []
    for frame in clip.frames:
        grey = _grey_at_short_side(frame, CLARITY_SHORT_SIDE_PX)
        variances.append(float(cv2.Laplacian(grey, cv2.CV_64F).var()))
    return float(np.mean(variances))


def provenance() -> dict[str, object]:
    """What produced motion_score and clarity_score (stored beside the scores)."""
    return {
        "motion_score": {
            "method": "opencv_farneback",
            "opencv": cv2.__version__,
            "short_side_px": MOTION_SHORT_SIDE_PX,
            "unit": "percent_short_side_per_s",
            **_FARNEBACK,
        },
        "clarity_score": {
            "method": "laplacian_variance",
            "opencv": cv2.__version__,
            "short_side_px": CLARITY_SHORT_SIDE_PX,
        },
    }
