"""The reference splitter the scene-detection tests compare ours against: PySceneDetect's own
`detect()`, exactly as its users call it."""

from __future__ import annotations

from pathlib import Path

from scenedetect import AdaptiveDetector
from scenedetect import detect as scenedetect_detect


def scenes_with_pyscenedetect(
    path: str | Path, threshold: float = 3.0, min_scene_len: int = 15
) -> list[tuple[int, int]]:
    """Reference: PySceneDetect's own `detect()` with AdaptiveDetector on a local file, as
    [start, end) frame ranges (a single full-length scene when there is no cut)."""
    scenes = scenedetect_detect(
        str(path),
        AdaptiveDetector(adaptive_threshold=threshold, min_scene_len=min_scene_len),
        start_in_scene=True,
    )
    return [(start.frame_num, end.frame_num) for start, end in scenes]
