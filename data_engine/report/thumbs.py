"""Clip thumbnails for the report: a few frames decoded at each clip's own time range.

Requests are grouped by video so each file is opened once; within a video the decoder seeks to
the keyframe before each wanted time and decodes forward to it (or keeps decoding when the next
time is close ahead, `_SEEK_GAP_S`). Frames are scaled to `height_px` display pixels and turned
for display by the video's `rotation_deg` (videos table), as the scorers saw them.
A clip that cannot be decoded gets an error text in place of its image; the report goes on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import av.error
import numpy as np
from PIL import Image
from tqdm import tqdm

from data_engine.video import (
    VideoError,
    apply_rotation,
    decode_frames,
    open_container,
    rotation_from_frame,
    video_stream,
)

_SEEK_GAP_S = 2.0  # decode forward instead of seeking when the next time is this close ahead
_DECODE_TIMEOUT_S = 30.0  # budget per video for one report's thumbnails (seconds)
_JPEG_QUALITY = 82


@dataclass
class ThumbRequest:
    """Frames wanted from one clip, at times in seconds from the start of its video."""

    clip_id: str
    uri: str
    times_s: list[float]
    rotation_deg: int | None  # clockwise display rotation; None: read it from the frames
    strip: bool = True  # one image with the frames side by side; False: one image per time
    images: list[str] = field(default_factory=list)  # file names written, one per time
    error: str = ""  # why no image was written


# What a request is made of (the rest is filled in by `write_thumbnails`): report.json lists it.
THUMB_FIELDS = ("clip_id", "uri", "times_s", "rotation_deg", "strip")


def clip_times(start_s: float, end_s: float, num_frames: int) -> list[float]:
    """`num_frames` times spread over [start_s, end_s): the centres of equal parts."""
    span = max(end_s - start_s, 0.0)
    return [start_s + span * (i + 0.5) / num_frames for i in range(num_frames)]


def _scaled_size(frame: av.VideoFrame, rotation_deg: int, height_px: int) -> tuple[int, int]:
    """Coded (width, height) whose display height, after rotation, is `height_px`."""
    turned = rotation_deg in (90, 270)
    display_h = frame.width if turned else frame.height
    scale = height_px / max(display_h, 1)
    return max(2, round(frame.width * scale)), max(2, round(frame.height * scale))


def _frames_at(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    uri: str,
    times_s: list[float],
    deadline: float,
) -> Iterator[tuple[float, av.VideoFrame]]:
    """(wanted time, first frame at or after it) for each of the sorted `times_s`."""
    frames: Iterator[av.VideoFrame] | None = None
    last_s = -np.inf
    half_frame_s = 0.5 / float(stream.average_rate or 25)
    origin_s = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
    for wanted_s in times_s:
        if frames is None or wanted_s < last_s or wanted_s - last_s > _SEEK_GAP_S:
            target = int((origin_s + max(wanted_s - 0.5, 0.0)) / stream.time_base)
            container.seek(target, stream=stream, backward=True, any_frame=False)
            frames = decode_frames(container, stream, uri, "report", deadline)
        chosen = None
        for frame in frames:
            last_s = float(frame.time) - origin_s if frame.time is not None else last_s
            chosen = frame
            if last_s >= wanted_s - half_frame_s:
                break
        if chosen is None:
            raise VideoError("report", "truncated", f"{uri}: no frame decodes at {wanted_s:.2f} s")
        yield wanted_s, chosen


def decode_video(
    uri: str, requests: list[ThumbRequest], height_px: int
) -> dict[tuple[str, float], np.ndarray]:
    """{(clip_id, time): RGB image (H, W, 3) at display orientation} for one video's requests."""
    wanted = sorted({(t, r.clip_id) for r in requests for t in r.times_s})
    rotation = {r.clip_id: r.rotation_deg for r in requests}
    deadline = time.monotonic() + _DECODE_TIMEOUT_S
    images: dict[tuple[str, float], np.ndarray] = {}
    with open_container(uri, None, "report", _DECODE_TIMEOUT_S) as container:
        stream = video_stream(container, uri, "report")
        times = sorted({t for t, _ in wanted})
        for wanted_s, frame in _frames_at(container, stream, uri, times, deadline):
            for clip_id in (c for t, c in wanted if t == wanted_s):
                deg = rotation[clip_id]
                deg = rotation_from_frame(frame) if deg is None else deg
                width, height = _scaled_size(frame, deg, height_px)
                rgb = frame.to_ndarray(format="rgb24", width=width, height=height)
                images[(clip_id, wanted_s)] = apply_rotation(rgb, deg)
    return images


def _save_jpeg(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, format="JPEG", quality=_JPEG_QUALITY)


def write_thumbnails(
    requests: list[ThumbRequest],
    out_dir: Path,
    height_px: int,
    progress: bool = True,
) -> None:
    """Decode every request and write its JPEG files into `out_dir` (names into `images`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = {id(request): f"{index:05d}" for index, request in enumerate(requests)}
    by_uri: dict[str, list[ThumbRequest]] = {}
    for request in requests:
        by_uri.setdefault(request.uri, []).append(request)
    bar = tqdm(
        total=len(requests), desc="thumbnails", unit="clip", file=sys.stderr, disable=not progress
    )
    with bar:
        for uri, group in by_uri.items():
            try:
                images = decode_video(uri, group, height_px)
            except (VideoError, av.error.FFmpegError, OSError) as err:
                for request in group:
                    request.error = str(err).splitlines()[0] if str(err) else type(err).__name__
                bar.update(len(group))
                continue
            for request in group:
                _write_request(request, images, out_dir, stems[id(request)])
                bar.update(1)


def _write_request(
    request: ThumbRequest, images: dict[tuple[str, float], np.ndarray], out_dir: Path, stem: str
) -> None:
    frames = [images[(request.clip_id, t)] for t in request.times_s]
    if request.strip:
        height = min(f.shape[0] for f in frames)
        joined = np.concatenate([f[:height] for f in frames], axis=1)
        name = f"{stem}.jpg"
        _save_jpeg(joined, out_dir / name)
        request.images = [name]
        return
    request.images = []
    for index, frame in enumerate(frames):
        name = f"{stem}-{index}.jpg"
        _save_jpeg(frame, out_dir / name)
        request.images.append(name)
