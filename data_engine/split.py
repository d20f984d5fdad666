"""Scene splitting: PySceneDetect's detectors fed by our own fast PyAV decode.

PySceneDetect's CLI decodes every frame to full-resolution BGR with OpenCV, then resizes it with
`cv2.resize`. We decode the same frames with FFmpeg's threading and let swscale convert YUV
straight to the small BGR frame the detectors need (one pass, no full-size BGR image), then
call the detectors' own `process_frame`. Frame numbers are the count of decoded frames, exactly
as PySceneDetect's OpenCV backend numbers them, so cuts compare one to one with its CLI.

Cuts come from AdaptiveDetector (or ContentDetector); fades through black from
ThresholdDetector, whose fade-out/fade-in crossings we read to drop the dark frames entirely.
Then: trim a few frames at every transition, drop short clips, chunk long ones.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from av.video.reformatter import VideoReformatter
from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode, ThresholdDetector
from scenedetect import detect as scenedetect_detect
from scenedetect.scene_manager import compute_downscale_factor

from data_engine.video import (
    VideoError,
    VideoInfo,
    decode_frames,
    open_container,
    video_stream,
)


@dataclass
class SplitConfig:
    """Scene detection and clip shaping."""

    detector: str = "adaptive"  # cut detector: "adaptive" (AdaptiveDetector) | "content"
    adaptive_threshold: float = 3.0  # AdaptiveDetector: frame score / neighbours' mean to cut
    min_content_val: float = 15.0  # AdaptiveDetector: minimum content score for a cut (0-255)
    content_threshold: float = 27.0  # ContentDetector: content score that triggers a cut (0-255)
    min_scene_len_frames: int = 15  # detectors: minimum frames between two cuts (frames)
    fade_enabled: bool = True  # detect fades through black with ThresholdDetector
    fade_threshold: float = (
        12.0  # ThresholdDetector: mean 8-bit intensity below which a frame is dark
    )
    min_clip_s: float = 2.0  # clips shorter than this are dropped (seconds)
    max_clip_s: float = 20.0  # longer scenes are cut into equal windows of at most this (seconds)
    trim_frames: int = 2  # frames dropped on each side of every cut or fade (frames)
    downscale: int = 0  # detection downscale factor; 0 = PySceneDetect's auto (~256 px wide)
    timeout_s: float = 600.0  # decode budget per video for detection (seconds)

    def __post_init__(self) -> None:
        if self.detector not in ("adaptive", "content"):
            raise ValueError("split.detector: must be 'adaptive' or 'content'")
        if self.adaptive_threshold <= 0:
            raise ValueError("split.adaptive_threshold: must be > 0")
        if not 0 <= self.min_content_val <= 255:
            raise ValueError("split.min_content_val: must be in [0, 255]")
        if not 0 < self.content_threshold <= 255:
            raise ValueError("split.content_threshold: must be in (0, 255]")
        if self.min_scene_len_frames < 0:
            raise ValueError("split.min_scene_len_frames: must be >= 0")
        if not 0 < self.fade_threshold < 255:
            raise ValueError("split.fade_threshold: must be in (0, 255)")
        if self.min_clip_s < 0:
            raise ValueError("split.min_clip_s: must be >= 0 seconds")
        if self.max_clip_s <= 0 or self.max_clip_s < self.min_clip_s:
            raise ValueError("split.max_clip_s: must be > 0 and >= split.min_clip_s")
        if self.trim_frames < 0:
            raise ValueError("split.trim_frames: must be >= 0")
        if self.downscale < 0:
            raise ValueError("split.downscale: must be >= 0 (0 = auto)")
        if self.timeout_s <= 0:
            raise ValueError("split.timeout_s: must be > 0 seconds")


@dataclass
class SceneDetection:
    """Raw detector output for one video, before clips are shaped."""

    num_frames: int  # frames decoded
    fps: float
    cuts: list[int] = field(default_factory=list)  # first frame of each new shot (hard cuts)
    dark_ranges: list[tuple[int, int]] = field(default_factory=list)  # [start, end) below threshold


def _cut_detector(cfg: SplitConfig) -> ContentDetector:
    if cfg.detector == "adaptive":
        return AdaptiveDetector(
            adaptive_threshold=cfg.adaptive_threshold,
            min_scene_len=cfg.min_scene_len_frames,
            min_content_val=cfg.min_content_val,
        )
    return ContentDetector(threshold=cfg.content_threshold, min_scene_len=cfg.min_scene_len_frames)


def detection_size(width: int, height: int, downscale: int) -> tuple[int, int]:
    """(width, height) the detectors see: PySceneDetect's own downscale rule and rounding."""
    factor = compute_downscale_factor(max(width, height)) if downscale == 0 else downscale
    if factor <= 1:
        return width, height
    return max(1, round(width / factor)), max(1, round(height / factor))


def run_detectors(
    uri: str,
    info: VideoInfo,
    cfg: SplitConfig,
    storage_options: dict[str, Any] | None = None,
    deadline: float | None = None,
) -> SceneDetection:
    """Decode the video once and run the cut and fade detectors on every frame."""
    if deadline is None:
        deadline = time.monotonic() + cfg.timeout_s
    cut_detector = _cut_detector(cfg)
    fade_detector = ThresholdDetector(threshold=cfg.fade_threshold, min_scene_len=0)
    fps = Fraction(info.fps).limit_denominator(1001 * 1000)
    result = SceneDetection(num_frames=0, fps=info.fps)
    # Detection runs on the stored (coded) picture: rotation does not change content scores.
    coded_w, coded_h = info.coded_size
    det_w, det_h = detection_size(coded_w, coded_h, cfg.downscale)
    dark_start: int | None = None
    index = -1
    # One reformatter for the whole video: it keeps its swscale context between frames
    # (`frame.to_ndarray(width=...)` would build a new one per frame, ~1.5x slower).
    reformatter = VideoReformatter()
    with open_container(uri, storage_options, "split", cfg.timeout_s) as container:
        stream = video_stream(container, uri, "split")
        for frame in decode_frames(container, stream, uri, "split", deadline):
            index += 1
            # swscale: YUV -> small BGR in one step (PySceneDetect's detectors expect BGR).
            image = reformatter.reformat(
                frame, width=det_w, height=det_h, format="bgr24", interpolation="BILINEAR"
            ).to_ndarray()
            timecode = FrameTimecode(index, fps=fps)
            result.cuts += [tc.frame_num for tc in cut_detector.process_frame(timecode, image)]
            if cfg.fade_enabled:
                fade_detector.process_frame(timecode, image)
                # The detector tracks each threshold crossing in `last_fade`; a fade-out starts
                # a dark range at that frame, the next fade-in ends it.
                fade_type = fade_detector.last_fade["type"]
                if fade_type == "out" and dark_start is None:
                    dark_start = fade_detector.last_fade["frame"].frame_num
                elif fade_type == "in" and dark_start is not None:
                    result.dark_ranges.append((dark_start, index))
                    dark_start = None
    result.num_frames = index + 1
    if result.num_frames == 0:
        raise VideoError("split", "decode_error", f"{uri}: no frame decodes")
    end_timecode = FrameTimecode(index, fps=fps)
    result.cuts += [tc.frame_num for tc in cut_detector.post_process(end_timecode)]
    result.cuts = sorted(set(result.cuts))
    if dark_start is not None:
        result.dark_ranges.append((dark_start, result.num_frames))
    return result


def shape_clips(detection: SceneDetection, cfg: SplitConfig) -> list[tuple[int, int]]:
    """Shots between cuts, minus dark frames, trimmed at transitions, filtered, chunked."""
    n = detection.num_frames
    # Segment boundaries: each is (frame, is_transition). Video start and end are not
    # transitions and are not trimmed.
    pieces: list[tuple[int, int]] = []
    bounds = [0, *[c for c in detection.cuts if 0 < c < n], n]
    for start, end in itertools.pairwise(bounds):
        pieces.append((start, end))
    for dark_start, dark_end in detection.dark_ranges:
        split_pieces = []
        for start, end in pieces:
            if dark_end <= start or dark_start >= end:
                split_pieces.append((start, end))
                continue
            if start < dark_start:
                split_pieces.append((start, dark_start))
            if dark_end < end:
                split_pieces.append((dark_end, end))
        pieces = split_pieces

    min_len = max(1, math.ceil(cfg.min_clip_s * detection.fps - 1e-9))
    max_len = max(1, math.floor(cfg.max_clip_s * detection.fps + 1e-9))
    clips = []
    for start, end in pieces:
        trimmed_start = start + cfg.trim_frames if start > 0 else start
        trimmed_end = end - cfg.trim_frames if end < n else end
        length = trimmed_end - trimmed_start
        if length < min_len:
            continue
        # Equal windows rather than max-length windows plus a stub: every chunk stays long.
        num_chunks = math.ceil(length / max_len)
        edges = [trimmed_start + round(i * length / num_chunks) for i in range(num_chunks + 1)]
        for chunk_start, chunk_end in itertools.pairwise(edges):
            if chunk_end - chunk_start >= min_len:
                clips.append((chunk_start, chunk_end))
    return clips


def detect_scenes(
    uri: str,
    info: VideoInfo,
    cfg: SplitConfig,
    storage_options: dict[str, Any] | None = None,
    deadline: float | None = None,
) -> list[tuple[int, int]]:
    """Clip frame ranges [start, end) of one video after cuts, fades, trim, min and max."""
    detection = run_detectors(uri, info, cfg, storage_options, deadline)
    return shape_clips(detection, cfg)


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
