"""The per-video work of `stiv curate`: one streaming decode per video.

Each decoded frame is used at most twice and never converted to full-size RGB:

    decode (PyAV, `split.decode_threads` FFmpeg threads)
      -> Y/U/V planes shrunk in C to the detectors' size -> SceneTracker (cuts, fades)
      -> for frames the sampler may need: planes shrunk to the sampling size -> RGB
    a shot closes -> its clips are shaped -> each clip's frames picked from what was kept
      -> the "task" stages (motion, clarity) score it right here -> one clip result

Sampling while the cuts are still unknown (`ShotFrames`): the clip's K evenly spread sample
positions are known only once its shot has ended, so the open shot keeps candidate frames on a
grid anchored at its first frame (every frame at first) plus each candidate's optical-flow
pair; past `sampling.candidates_per_shot` candidates the grid step doubles and every other one
is dropped. Each sample position is then the nearest kept candidate inside the clip, which is
exact for shots of up to that many frames; the frames actually used are recorded per clip
(`sample_frames`, `sample_pair_frames`) so a later backfill decodes exactly the same ones.
Memory per video is bounded: an unbroken shot is closed every `split.long_shot_factor *
split.max_clip_s` seconds (see `SceneTracker`).

A video whose frames cannot be decoded yields a failure for the whole video (its clips so far
are then dropped by the driver); a clip that a task stage cannot score records the error on
that clip only. The same module decodes the sampled frames of known clips for a backfill
(`sample_known_clips`).
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

import numpy as np
from av.video.reformatter import VideoReformatter

from data_engine.frames import ClipFrames
from data_engine.split import SceneTracker, SplitConfig, detection_size, shape_segment
from data_engine.stages.base import ClipInput, Stage
from data_engine.video import (
    SamplingConfig,
    VideoError,
    VideoInfo,
    apply_rotation,
    clip_frames_from,
    clip_id_for,
    clip_sample_indices,
    decode_frames,
    even_size,
    first_frame,
    frame_time_s,
    frame_to_array,
    info_from_stream,
    input_size_bytes,
    iter_clip_frames,
    open_container,
    sample_size,
    stream_start_s,
    video_stream,
)


@dataclass
class ClipResult:
    """One clip: its columns (core + task-stage scores), its sampled frames (None when no
    stage downstream reads frames) and the errors recorded on it ([stage, type, message])."""

    row: dict[str, Any]
    frames: ClipFrames | None
    errors: list[list[str]] = field(default_factory=list)


@dataclass
class VideoResult:
    """The end of one video: its metadata and clip count, or why it failed."""

    uri: str
    video_id: str
    info: VideoInfo | None
    num_clips: int
    error: VideoError | None = None


class ShotFrames:
    """Frames kept for the open shot while its clips' sample positions are still unknown.

    Candidates lie on a grid `anchor + k * stride`; each keeps its pair `gap` frames later.
    When there are more than `capacity` candidates, `stride` doubles and the off-grid ones
    (and their pairs) are freed, so memory stays at about 2 x capacity frames per video.
    """

    def __init__(self, capacity: int, gap: int, first_stride: int = 1) -> None:
        self.capacity = capacity
        self.gap = gap
        self.first_stride = max(1, first_stride)
        self.anchor = 0
        self.stride = self.first_stride
        self.candidates: list[int] = []  # sorted frame indices
        self.images: dict[int, np.ndarray] = {}
        self.times: dict[int, float] = {}

    def _on_grid(self, index: int) -> bool:
        return index >= self.anchor and (index - self.anchor) % self.stride == 0

    def wants(self, index: int) -> bool:
        """Whether frame `index` must be kept: a candidate, or a candidate's pair."""
        return self._on_grid(index) or self._on_grid(index - self.gap)

    def add(self, index: int, image: np.ndarray, time_s: float) -> None:
        self.images[index] = image
        self.times[index] = time_s
        if self._on_grid(index):
            self.candidates.append(index)
            if len(self.candidates) > self.capacity:
                self.stride *= 2
                self.candidates = [c for c in self.candidates if self._on_grid(c)]
                self._free()

    def _free(self, before: int | None = None) -> None:
        keep = set(self.candidates) | {c + self.gap for c in self.candidates}
        for index in list(self.images):
            if index not in keep or (before is not None and index < before):
                del self.images[index]
                self.times.pop(index, None)

    def restart(self, start: int) -> None:
        """A new shot starts at `start`: frames before it are freed, later ones carried over
        (detectors report a cut a few frames after it happened)."""
        self.anchor, self.stride = start, self.first_stride
        self.candidates = [c for c in self.candidates if c >= start]
        self._free(before=start)

    def take(
        self, start: int, end: int, cfg: SamplingConfig
    ) -> tuple[list[tuple[int, int]], ClipFrames]:
        """(frame, pair) indices and frames for the clip [start, end): each of the clip's
        evenly spread sample positions snapped to the nearest kept candidate inside it."""
        last = end - 1
        inside = self.candidates[
            bisect.bisect_left(self.candidates, start) : bisect.bisect_right(self.candidates, last)
        ]
        with_pair = [c for c in inside if c + self.gap <= last] or inside
        if not with_pair:
            raise ValueError(f"no frame was kept inside the clip [{start}, {end})")
        kept = sorted(self.images)
        pairs = []
        for position, _ in clip_sample_indices(start, end, cfg):
            frame = min(with_pair, key=lambda c: (abs(c - position), c))
            pair = min(frame + self.gap, last)
            if pair not in self.images:
                later = [i for i in kept if frame < i <= last]
                pair = later[-1] if later else frame
            pairs.append((frame, pair))
        clip = clip_frames_from(pairs, self.images, self.times)
        if self.gap == 0:  # no stage reads pairs: do not carry each frame twice
            empty = np.zeros((0, *clip.frames.shape[1:]), np.uint8)
            clip = ClipFrames(clip.frames, clip.times_s, empty, np.zeros(0))
        return pairs, clip


def _threads(cfg: SplitConfig, cpus_per_task: float) -> int:
    return cfg.decode_threads or max(1, math.ceil(cpus_per_task))


def sampling_provenance(cfg: Any) -> str:
    """How a clip's frames were chosen (stored with every clip)."""
    policy = {
        **asdict(cfg.sampling),
        "method": "evenly spread positions snapped to kept shot candidates",
    }
    return json.dumps(policy, sort_keys=True)


def clip_row(
    info: VideoInfo,
    start: int,
    end: int,
    provenance: str,
    start_s: float | None = None,
    end_s: float | None = None,
) -> dict[str, Any]:
    """The core clip columns (`data_engine.schema.CLIP_CORE_SCHEMA`) of [start, end).

    `start_s` is the timestamp of frame `start` and `end_s` that of frame `end` (the first
    frame after the clip), both from the stream's start: with a variable frame rate (phones,
    screen recordings) frame / fps drifts from where the frames really are. Without both, or
    when they run backwards (a broken file), both are frame / fps."""
    fps = info.fps or 1.0
    if start_s is None or end_s is None or end_s <= start_s:
        start_s, end_s = start / fps, end / fps
    return {
        "clip_id": clip_id_for(info.video_id, start, end),
        "video_id": info.video_id,
        "uri": info.uri,
        "start_frame": start,
        "end_frame": end,
        "start_s": start_s,
        "end_s": end_s,
        "duration_s": end_s - start_s,
        "fps": info.fps,
        "width": info.width,
        "height": info.height,
        "orientation": info.orientation,
        "sampling_provenance": provenance,
    }


def run_task_stages(stages: list[Stage], clip: ClipResult) -> None:
    """Score one clip with the in-pass stages; a stage's error stays on this clip."""
    for stage in stages:
        (result,) = stage([ClipInput(clip.row, clip.frames)])
        if "error" in result:
            clip.errors.append([stage.name, "stage_error", str(result["error"])])
        else:
            clip.row.update(result)


def scan_video(
    uri: str,
    cfg: Any,
    task_stages: list[Stage],
    keep_frames: bool,
    cpus_per_task: float = 1.0,
    source: str | BinaryIO | None = None,
    keep_pairs: bool = True,
) -> Iterator[ClipResult | VideoResult]:
    """Probe, split and sample one video in one decode; yields each clip as soon as its shot
    ends, then one VideoResult. Never raises for a bad video: the VideoResult carries it."""
    from data_engine.video import video_id_for

    video_id = video_id_for(uri)
    info: VideoInfo | None = None
    num_clips = 0
    try:
        for item in _scan(uri, cfg, task_stages, keep_frames, keep_pairs, cpus_per_task, source):
            if isinstance(item, VideoInfo):
                info = item
            else:
                num_clips += 1
                yield item
    except VideoError as err:
        yield VideoResult(uri, video_id, info, num_clips, err)
        return
    except Exception as err:  # an unexpected decoder failure is still this video's failure
        error = VideoError("split", type(err).__name__, f"{uri}: {err}")
        yield VideoResult(uri, video_id, info, num_clips, error)
        return
    yield VideoResult(uri, video_id, info, num_clips)


def _scan(
    uri: str,
    cfg: Any,
    task_stages: list[Stage],
    keep_frames: bool,
    keep_pairs: bool,
    cpus_per_task: float,
    source: str | BinaryIO | None,
) -> Iterator[ClipResult | VideoInfo]:
    split: SplitConfig = cfg.split
    sampling: SamplingConfig = cfg.sampling
    storage = cfg.storage_options or None
    if source is None:
        size = input_size_bytes(uri, storage)
        if size is None:
            raise VideoError("probe", "not_found", f"{uri}: no such file")
        if size == 0:
            raise VideoError("probe", "empty_file", f"{uri}: the file is empty (0 bytes)")
    opened = time.monotonic()
    deadline: float | None = opened + cfg.probe_timeout_s  # until the duration is known
    with open_container(uri, storage, "probe", cfg.probe_timeout_s, deadline, source) as container:
        stream = video_stream(
            container, uri, "probe", _threads(split, cpus_per_task), split.skip_loop_filter
        )
        first, rest = first_frame(container, stream, uri, "probe", deadline)
        if first is None:
            raise VideoError("probe", "decode_error", f"{uri}: no video frame decodes")
        header_frames = int(stream.frames) if stream.frames and stream.frames > 0 else 0
        info = info_from_stream(uri, container, stream, first, header_frames)
        # The whole decode's budget grows with the video (a base plus a cost per second).
        deadline = opened + split.budget_s(info.duration_s or 0.0)
        frames = itertools.chain(rest, decode_frames(container, stream, uri, "split", deadline))
        yield info

        provenance = sampling_provenance(cfg)
        tracker = SceneTracker(split, info.fps)
        # The shortest clip kept still gets about twice frames_per_clip candidates; an
        # optical-flow pair is kept only when a stage reads pairs (motion).
        min_len = max(1, math.ceil(split.min_clip_s * info.fps))
        first_stride = max(1, min_len // (2 * sampling.frames_per_clip))
        gap = sampling.motion_gap_frames if keep_pairs else 0
        shot = ShotFrames(sampling.candidates_per_shot, gap, first_stride)
        det_w, det_h = even_size(*detection_size(*info.coded_size, split.downscale))
        out_w, out_h = sample_size(*info.coded_size, sampling.max_side)
        reformatter = VideoReformatter()
        start_s = stream_start_s(stream)
        # Timestamps of the frames a clip may still start or end at (shots close late), and
        # where the last decoded frame ends: a clip's start_s and end_s are real timestamps.
        times: dict[int, float] = {}
        video_end_s = 0.0

        def close(segments) -> Iterator[ClipResult]:
            for segment in segments:
                for start, end in shape_segment(segment, info.fps, split):
                    row = clip_row(
                        info, start, end, provenance, times.get(start), times.get(end, video_end_s)
                    )
                    clip = ClipResult(row, None)
                    if keep_frames:
                        try:
                            pairs, clip.frames = shot.take(start, end, sampling)
                            clip.row["sample_frames"] = [p[0] for p in pairs]
                            clip.row["sample_pair_frames"] = [p[1] for p in pairs]
                        except ValueError as err:
                            clip.errors.append(["sample", "no_frames", str(err)])
                    if clip.frames is not None:
                        run_task_stages(task_stages, clip)
                    yield clip
            if tracker.open_start != shot.anchor:
                shot.restart(tracker.open_start)
            if segments:
                for old in [i for i in times if i < tracker.open_start]:
                    del times[old]

        index = 0
        frame = first
        period_s = 1.0 / (info.fps or 1.0)
        try:
            while frame is not None:
                time_s = frame_time_s(frame, start_s, index, info.fps)
                times[index] = time_s
                video_end_s = max(video_end_s, time_s + period_s)
                image = frame_to_array(frame, det_w, det_h, "bgr24", reformatter, sharp=False)
                yield from close(tracker.push(index, image))
                if keep_frames and not tracker.in_dark and shot.wants(index):
                    rgb = frame_to_array(frame, out_w, out_h, "rgb24", reformatter)
                    shot.add(index, apply_rotation(rgb, info.rotation_deg), time_s)
                frame = next(frames, None)
                index += 1
        except VideoError as err:
            if err.error_type == "decode_error" and index < header_frames:
                # What the probe's tail check used to catch: a cut-off upload.
                raise VideoError(
                    "probe",
                    "truncated",
                    f"{uri}: frame {index} of {header_frames} does not decode: {err.message}",
                ) from err
            raise
        yield from close(tracker.finish())

    info.num_frames = tracker.num_frames
    if info.duration_s <= 0:
        info.duration_s = tracker.num_frames / (info.fps or 1.0)
    # What the probe's tail check used to catch: a header that promises frames never written.
    if header_frames and tracker.num_frames < header_frames - max(2, header_frames // 100):
        raise VideoError(
            "probe",
            "truncated",
            f"{uri}: only {tracker.num_frames} of the {header_frames} frames decode",
        )


def sample_known_clips(
    info: VideoInfo,
    clips: list[dict[str, Any]],
    cfg: Any,
    cpus_per_task: float = 1.0,
) -> Iterator[tuple[int, ClipFrames]]:
    """(clip index, frames) for clips already in the table (backfill): one decode up to the
    last needed frame, exactly the frames recorded in `sample_frames`/`sample_pair_frames`
    (the evenly spread positions when a clip has none recorded)."""
    pairs = []
    for clip in clips:
        frames, partners = clip.get("sample_frames"), clip.get("sample_pair_frames")
        if frames and partners and len(frames) == len(partners):
            pairs.append(list(zip(frames, partners)))
        else:
            pairs.append(clip_sample_indices(clip["start_frame"], clip["end_frame"], cfg.sampling))
    ranges = [(c["start_frame"], c["end_frame"]) for c in clips]
    deadline = time.monotonic() + cfg.sampling.budget_s(info.duration_s)
    yield from iter_clip_frames(
        info.uri,
        info,
        ranges,
        cfg.sampling,
        cfg.storage_options or None,
        deadline,
        pairs=pairs,
        threads=_threads(cfg.split, cpus_per_task),
    )
