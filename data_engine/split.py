"""Scene splitting: PySceneDetect's detectors fed by our own fast PyAV decode.

PySceneDetect's CLI decodes every frame to full-resolution BGR with OpenCV, then resizes it with
`cv2.resize`. We decode the same frames with PyAV, shrink the decoder's own Y, U and V planes
with `cv2.resize(INTER_LINEAR)` (as PySceneDetect does) and convert only the small picture to BGR
(`data_engine.video.frame_to_array`): the
full-size colour conversion, which costs more than decoding H.264, never happens
(docs/design-notes.md "Where decode time goes"). The detectors' own `process_frame` then runs
on that small frame. Frame numbers are the count of decoded frames, exactly
as PySceneDetect's OpenCV backend numbers them, so cuts compare one to one with its CLI.

Cuts come from AdaptiveDetector (or ContentDetector); fades through black from
ThresholdDetector, whose fade-out/fade-in crossings we read to drop the dark frames entirely.
Then: trim a few frames at every transition, drop short clips, chunk long ones.

`SceneTracker` does all of this online, one frame at a time, so the streaming pass over a video
(`data_engine.scan`) can close a shot's clips as soon as the shot ends; `run_detectors` +
`shape_clips` are the same rules over a whole video at once.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import numpy as np
from av.video.reformatter import VideoReformatter
from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode, ThresholdDetector
from scenedetect.scene_manager import compute_downscale_factor

from data_engine.video import (
    VideoError,
    VideoInfo,
    decode_frames,
    even_size,
    frame_to_array,
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
    timeout_s: float = 60.0  # decode budget per video: this base (seconds) ...
    timeout_per_video_s: float = 2.0  # ... plus this many seconds per second of video
    decode_threads: int = 0  # FFmpeg decoder threads per video; 0 = the task's CPUs (rounded up)
    # Deblocking on the curation pass: "noref" skips it on frames nothing predicts from (no
    # error propagates; cheaper decode, clarity moved 0.04%), "none" decodes every frame exactly.
    skip_loop_filter: Literal["none", "noref"] = "noref"
    long_shot_factor: int = 2  # an unbroken shot is closed every this many max_clip_s (memory)

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
        if self.timeout_per_video_s < 0:
            raise ValueError("split.timeout_per_video_s: must be >= 0 seconds per second")
        if self.skip_loop_filter not in ("none", "noref"):
            raise ValueError("split.skip_loop_filter: must be 'none' or 'noref'")
        if self.decode_threads < 0:
            raise ValueError("split.decode_threads: must be >= 0 (0 = the task's CPUs)")
        if self.long_shot_factor < 1:
            raise ValueError("split.long_shot_factor: must be >= 1")

    def budget_s(self, duration_s: float) -> float:
        """Decode budget for a video of `duration_s` seconds: a three-hour film gets hours, a
        decode that hangs is still stopped."""
        return self.timeout_s + self.timeout_per_video_s * max(0.0, duration_s)


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


@dataclass(frozen=True)
class Segment:
    """A stretch of frames [start, end) with no cut and no dark frame inside; `trim_start` and
    `trim_end` say whether each side is a transition (cut or fade), where frames are trimmed."""

    start: int
    end: int
    trim_start: bool
    trim_end: bool


class SceneTracker:
    """Cut and fade detection one frame at a time, closing segments as soon as they end.

    `push(index, small_bgr_image)` feeds the next decoded frame (indices count decoded frames
    from 0, as PySceneDetect numbers them) and returns the segments that closed; `finish()`
    closes the last one. Hard cuts come from AdaptiveDetector/ContentDetector (reported a few
    frames late: AdaptiveDetector looks `window_width` frames ahead), dark stretches from
    ThresholdDetector's fade-out/fade-in crossings. An unbroken shot is closed every
    `long_shot_factor * max_clip_s` (a segment boundary that is not a transition, so nothing
    is trimmed there): the streaming pass then never holds a long shot's frames for ever.
    """

    # Frames between the newest frame and a forced boundary: more than any detector's lookahead,
    # so a late-reported cut can never land before a boundary already placed.
    FORCE_LAG_FRAMES = 8

    def __init__(self, cfg: SplitConfig, fps: float) -> None:
        self.cfg = cfg
        self.fps = Fraction(fps).limit_denominator(1001 * 1000)
        self.cut_detector = _cut_detector(cfg)
        self.fade_detector = ThresholdDetector(threshold=cfg.fade_threshold, min_scene_len=0)
        max_len = max(1, math.floor(cfg.max_clip_s * fps + 1e-9))
        self.force_len = cfg.long_shot_factor * max_len
        self.cuts: list[int] = []
        self.dark_ranges: list[tuple[int, int]] = []
        self.open_start = 0  # first frame of the open segment
        self.open_trim = False  # the open segment starts at a transition
        self.dark_start: int | None = None  # set while inside a dark stretch
        self.num_frames = 0

    @property
    def in_dark(self) -> bool:
        return self.dark_start is not None

    def _close(self, end: int, trim_end: bool) -> list[Segment]:
        if self.in_dark or end <= self.open_start:
            return []
        return [Segment(self.open_start, end, self.open_trim, trim_end)]

    def _cut(self, cut: int) -> list[Segment]:
        if cut <= self.open_start or self.in_dark:
            return []  # a cut inside a dark stretch, or at a boundary already placed
        closed = self._close(cut, True)
        self.open_start, self.open_trim = cut, True
        return closed

    def push(self, index: int, image: np.ndarray) -> list[Segment]:
        timecode = FrameTimecode(index, fps=self.fps)
        self.num_frames = index + 1
        closed: list[Segment] = []
        for tc in self.cut_detector.process_frame(timecode, image):
            self.cuts.append(tc.frame_num)
            closed += self._cut(tc.frame_num)
        if self.cfg.fade_enabled:
            self.fade_detector.process_frame(timecode, image)
            fade_type = self.fade_detector.last_fade["type"]
            if fade_type == "out" and self.dark_start is None:
                dark_start = self.fade_detector.last_fade["frame"].frame_num
                closed += self._close(dark_start, True)
                self.dark_start = dark_start
            elif fade_type == "in" and self.dark_start is not None:
                self.dark_ranges.append((self.dark_start, index))
                self.dark_start = None
                self.open_start, self.open_trim = index, True
        boundary = index - self.FORCE_LAG_FRAMES
        if not self.in_dark and boundary - self.open_start >= self.force_len:
            closed += self._close(boundary, False)
            self.open_start, self.open_trim = boundary, False
        return closed

    def finish(self) -> list[Segment]:
        """Close the last segment at the end of the video (no trim at the video's end)."""
        closed: list[Segment] = []
        if self.num_frames == 0:
            return closed
        end_timecode = FrameTimecode(self.num_frames - 1, fps=self.fps)
        for tc in self.cut_detector.post_process(end_timecode):
            self.cuts.append(tc.frame_num)
            if tc.frame_num < self.num_frames:
                closed += self._cut(tc.frame_num)
        if self.dark_start is not None:
            self.dark_ranges.append((self.dark_start, self.num_frames))
        closed += self._close(self.num_frames, False)
        self.open_start = self.num_frames
        return closed


def run_detectors(
    uri: str,
    info: VideoInfo,
    cfg: SplitConfig,
    storage_options: dict[str, Any] | None = None,
    deadline: float | None = None,
) -> SceneDetection:
    """Decode the video once and run the cut and fade detectors on every frame."""
    if deadline is None:
        deadline = time.monotonic() + cfg.budget_s(info.duration_s)
    tracker = SceneTracker(cfg, info.fps)
    # Detection runs on the stored (coded) picture: rotation does not change content scores.
    det_w, det_h = even_size(*detection_size(*info.coded_size, cfg.downscale))
    reformatter = VideoReformatter()  # keeps one swscale context for the whole video
    index = -1
    with open_container(uri, storage_options, "split", cfg.timeout_s) as container:
        stream = video_stream(container, uri, "split")
        for index, frame in enumerate(decode_frames(container, stream, uri, "split", deadline)):
            tracker.push(index, frame_to_array(frame, det_w, det_h, "bgr24", reformatter, False))
    if index < 0:
        raise VideoError("split", "decode_error", f"{uri}: no frame decodes")
    tracker.finish()
    return SceneDetection(
        num_frames=tracker.num_frames,
        fps=info.fps,
        cuts=sorted(set(tracker.cuts)),
        dark_ranges=tracker.dark_ranges,
    )


def shape_segment(segment: Segment, fps: float, cfg: SplitConfig) -> list[tuple[int, int]]:
    """Clips of one segment: trimmed at its transitions, dropped when short, long ones cut into
    equal windows (rather than max-length windows plus a stub: every chunk stays long)."""
    min_len = max(1, math.ceil(cfg.min_clip_s * fps - 1e-9))
    max_len = max(1, math.floor(cfg.max_clip_s * fps + 1e-9))
    start = segment.start + cfg.trim_frames if segment.trim_start else segment.start
    end = segment.end - cfg.trim_frames if segment.trim_end else segment.end
    length = end - start
    if length < min_len:
        return []
    num_chunks = math.ceil(length / max_len)
    edges = [start + round(i * length / num_chunks) for i in range(num_chunks + 1)]
    return [(a, b) for a, b in itertools.pairwise(edges) if b - a >= min_len]


def shape_clips(detection: SceneDetection, cfg: SplitConfig) -> list[tuple[int, int]]:
    """Shots between cuts, minus dark frames, trimmed at transitions, filtered, chunked."""
    n = detection.num_frames
    pieces: list[tuple[int, int]] = list(
        itertools.pairwise([0, *[c for c in detection.cuts if 0 < c < n], n])
    )
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
    clips = []
    for start, end in pieces:
        # The video's own start and end are not transitions and are not trimmed.
        clips += shape_segment(Segment(start, end, start > 0, end < n), detection.fps, cfg)
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
