"""Video I/O: stable ids, opening local or object-store URIs, probing, sampling clip frames,
and writing H.264 MP4 files (`write_video`, for generated videos).

Every decode goes through PyAV with FFmpeg's own frame threading (`thread_type = "AUTO"`) and a
deadline checked between packets, so an untrusted file can slow a worker down but never hang it.
Failures are raised as `VideoError(stage, error_type, message)`; the pipeline turns them into
quarantine rows.

Rotation convention: `rotation_deg` is the clockwise rotation a player applies for display (the
legacy mp4 `rotate` tag; a phone's portrait video stored landscape has 90). PyAV reports the
display matrix as a counter-clockwise angle (`VideoFrame.rotation`), hence the sign flip below.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlparse

import av
import av.error
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter

from data_engine.frames import ClipFrames
from stiv_core.uris import is_local, local_path

T = TypeVar("T")

DEFAULT_PROBE_TIMEOUT_S = 120.0  # seconds; also the default of CurateConfig.probe_timeout_s
# Packets read after a seek before we give up looking for a decodable frame near the end.
_TAIL_CHECK_MAX_PACKETS = 600


class VideoError(Exception):
    """A video that cannot be probed, split or sampled; becomes one quarantine row.

    stage:      "probe" | "split" | "sample"
    error_type: short slug ("not_found", "empty_file", "invalid_container", "no_video_stream",
                "unsupported_codec", "decode_error", "truncated", "timeout", "io_error", ...)
    """

    def __init__(self, stage: str, error_type: str, message: str):
        super().__init__(f"{stage}/{error_type}: {message}")
        self.stage = stage
        self.error_type = error_type
        self.message = message


# ---------------------------------------------------------------------------------------------
# Ids and URIs
# ---------------------------------------------------------------------------------------------


def normalize_uri(uri: str) -> str:
    """Local paths become absolute paths; other URIs are kept as given (opaque strings)."""
    return local_path(uri) if is_local(uri) else uri


def video_id_for(uri: str) -> str:
    """Stable id of a video: first 16 hex chars of sha1(normalised URI)."""
    return hashlib.sha1(normalize_uri(uri).encode("utf-8")).hexdigest()[:16]


def clip_id_for(video_id: str, start_frame: int, end_frame: int) -> str:
    """Stable id of a clip: first 16 hex chars of sha1("video_id:start:end"), end exclusive."""
    key = f"{video_id}:{int(start_frame)}:{int(end_frame)}"
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


# Lance / object_store style option names -> pyarrow.fs.S3FileSystem keyword arguments, so one
# `storage_options` dict in the config serves both the Lance tables and the video reader.
_S3_OPTION_ALIASES = {
    "aws_access_key_id": "access_key",
    "access_key_id": "access_key",
    "aws_secret_access_key": "secret_key",
    "secret_access_key": "secret_key",
    "aws_session_token": "session_token",
    "session_token": "session_token",
    "aws_region": "region",
    "region": "region",
    "aws_endpoint": "endpoint_override",
    "aws_endpoint_url": "endpoint_override",
    "endpoint": "endpoint_override",
    "endpoint_url": "endpoint_override",
    "endpoint_override": "endpoint_override",
    "access_key": "access_key",
    "secret_key": "secret_key",
}


def remote_filesystem(uri: str, storage_options: dict[str, Any] | None):
    """(pyarrow FileSystem, path inside it) for an object-store URI."""
    import pyarrow.fs as pafs

    parsed = urlparse(uri)
    if not storage_options:
        return pafs.FileSystem.from_uri(uri)
    path = parsed.netloc + parsed.path
    if parsed.scheme in ("s3", "s3a"):
        kwargs: dict[str, Any] = {}
        for key, value in storage_options.items():
            name = _S3_OPTION_ALIASES.get(key.lower())
            if name is None:
                continue  # options meant for other readers (e.g. Lance-only settings)
            if name == "endpoint_override" and "://" in str(value):
                scheme, _, rest = str(value).partition("://")
                kwargs["scheme"] = scheme
                value = rest
            kwargs[name] = value
        return pafs.S3FileSystem(**kwargs), path
    if parsed.scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(**storage_options), path
    fs, fs_path = pafs.FileSystem.from_uri(uri)
    return fs, fs_path


def open_input(uri: str, storage_options: dict[str, Any] | None = None) -> str | BinaryIO:
    """What `av.open` should read: a local absolute path, or a seekable file object for an
    object-store URI (s3://, gs://, ...). The caller closes a returned file object."""
    if is_local(uri):
        return local_path(uri)
    fs, path = remote_filesystem(uri, storage_options)
    return fs.open_input_file(path)


class DeadlineReader:
    """A file object that refuses to read past a deadline: a stalled object-store read (or any
    Python-level source that stops delivering) is stopped at the next read call instead of
    holding the worker for ever. FFmpeg reads local files itself; those are bounded by the
    deadline checks between packets."""

    def __init__(self, source: BinaryIO, deadline: float | None, uri: str, stage: str) -> None:
        self.source = source
        self.deadline = deadline
        self.uri = uri
        self.stage = stage

    def read(self, size: int = -1) -> bytes:
        _check_deadline(self.deadline, self.stage, self.uri)
        return self.source.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        _check_deadline(self.deadline, self.stage, self.uri)
        return self.source.seek(offset, whence)

    def tell(self) -> int:
        return self.source.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> DeadlineReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def input_size_bytes(uri: str, storage_options: dict[str, Any] | None) -> int | None:
    """File size in bytes, None when it does not exist. Raises VideoError for I/O failures."""
    try:
        if is_local(uri):
            path = local_path(uri)
            return os.path.getsize(path) if os.path.isfile(path) else None
        import pyarrow.fs as pafs

        fs, path = remote_filesystem(uri, storage_options)
        file_info = fs.get_file_info(path)
        if file_info.type != pafs.FileType.File:
            return None
        return int(file_info.size)
    except OSError as err:
        raise VideoError("probe", "io_error", f"{uri}: {err}") from err


@contextmanager
def open_container(
    uri: str,
    storage_options: dict[str, Any] | None,
    stage: str,
    timeout_s: float | None,
    deadline: float | None = None,
    source: str | BinaryIO | None = None,
) -> Iterator[av.container.InputContainer]:
    """av.open with our error mapping; closes the container and any remote file object.
    `source` overrides what is read (a file object); file objects stop at `deadline`."""
    if source is None:
        source = open_input(uri, storage_options)
    if not isinstance(source, str):
        source = DeadlineReader(source, deadline, uri, stage)
    container = None
    try:
        try:
            # `timeout` bounds FFmpeg's blocking open/read calls (network protocols).
            container = av.open(source, mode="r", timeout=timeout_s)
        except av.error.FileNotFoundError as err:
            raise VideoError(stage, "not_found", f"{uri}: {err}") from err
        except av.error.ExitError as err:
            # PyAV's `timeout` interrupts FFmpeg's blocking call with AVERROR_EXIT.
            raise VideoError(stage, "timeout", f"{uri}: opening took over {timeout_s} s") from err
        except (av.error.InvalidDataError, av.error.EOFError) as err:
            raise VideoError(stage, "invalid_container", f"{uri}: {err}") from err
        except av.error.FFmpegError as err:
            raise VideoError(stage, "open_error", f"{uri}: {err}") from err
        yield container
    finally:
        if container is not None:
            container.close()
        if not isinstance(source, str):
            source.close()


def video_stream(
    container: av.container.InputContainer,
    uri: str,
    stage: str,
    threads: int = 0,
    skip_loop_filter: str = "none",
) -> av.video.stream.VideoStream:
    """The first video stream, its decoder set to `threads` FFmpeg threads (0 = FFmpeg's own
    choice, one per core of the machine). Inside a Ray task pass the task's CPUs: FFmpeg
    cannot see Ray's reservation, and N tasks x all-cores threads only adds contention.

    `skip_loop_filter="noref"` skips the deblocking filter on frames no other frame predicts
    from, so no error propagates (FFmpeg's generic `skip_loop_filter` decoder option; codecs
    without a loop filter ignore it). See docs/design-notes.md "Where decode time goes"."""
    if not container.streams.video:
        raise VideoError(stage, "no_video_stream", f"{uri}: the container has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise VideoError(stage, "unsupported_codec", f"{uri}: no decoder for this video codec")
    # Frame-and-slice threading inside FFmpeg.
    stream.thread_type = "AUTO"
    if threads > 0:
        stream.codec_context.thread_count = threads
    if skip_loop_filter != "none":
        stream.codec_context.options = {"skip_loop_filter": skip_loop_filter}
    return stream


def _check_deadline(deadline: float | None, stage: str, uri: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise VideoError(stage, "timeout", f"{uri}: decoding exceeded its time budget")


def decode_frames(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    uri: str,
    stage: str,
    deadline: float | None,
) -> Iterator[av.VideoFrame]:
    """Every frame of `stream` in presentation order, checking the deadline between packets
    and mapping FFmpeg errors to VideoError(stage, "decode_error")."""
    try:
        for packet in container.demux(stream):
            _check_deadline(deadline, stage, uri)
            yield from packet.decode()
    except av.error.ExitError as err:
        raise VideoError(stage, "timeout", f"{uri}: a read exceeded its time budget") from err
    except av.error.FFmpegError as err:
        raise VideoError(stage, "decode_error", f"{uri}: {err}") from err


def even_size(width: int, height: int) -> tuple[int, int]:
    """Round a size down to even numbers (4:2:0 chroma planes are half size), at least 2x2."""
    return max(2, width // 2 * 2), max(2, height // 2 * 2)


def plane_array(frame: av.VideoFrame, index: int) -> np.ndarray:
    """One picture plane of a decoded frame as a (height, width) uint8 view of FFmpeg's buffer
    (line padding sliced off, no copy)."""
    plane = frame.planes[index]
    rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
    return rows[:, : plane.width]


_PLANAR_420 = ("yuv420p", "yuvj420p")
_YUV_TO = {"bgr24": cv2.COLOR_YUV2BGR_I420, "rgb24": cv2.COLOR_YUV2RGB_I420}


def frame_to_array(
    frame: av.VideoFrame,
    width: int,
    height: int,
    fmt: str,
    reformatter: VideoReformatter,
    sharp: bool = True,
) -> np.ndarray:
    """The frame shrunk to (height, width, 3) uint8 in `fmt` ("bgr24" | "rgb24"); `width` and
    `height` even. For 8-bit 4:2:0 (nearly all H.264/HEVC/VP9/AV1) the Y, U and V planes are
    each resized and only the small picture is colour-converted: the full-size conversion
    (which costs more than decoding H.264) never happens (docs/design-notes.md). `sharp` picks
    INTER_AREA (every source pixel counts: frames the scorers see); otherwise INTER_LINEAR,
    8x cheaper at a 5x shrink and what PySceneDetect itself downscales with (the detectors'
    frames). Other pixel formats (10-bit, 4:2:2, RGB) go through swscale."""
    if frame.format.name not in _PLANAR_420:
        return reformatter.reformat(
            frame, width=width, height=height, format=fmt, interpolation="AREA"
        ).to_ndarray()
    yuv = np.empty((height * 3 // 2, width), np.uint8)
    luma = plane_array(frame, 0)
    interpolation = cv2.INTER_AREA if sharp and luma.shape[1] >= width else cv2.INTER_LINEAR
    cv2.resize(luma, (width, height), dst=yuv[:height], interpolation=interpolation)
    chroma = yuv[height:].reshape(2, height // 2, width // 2)
    for plane in (1, 2):
        cv2.resize(
            plane_array(frame, plane),
            (width // 2, height // 2),
            dst=chroma[plane - 1],
            interpolation=interpolation,
        )
    return cv2.cvtColor(yuv, _YUV_TO[fmt])


def first_frame(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    uri: str,
    stage: str,
    deadline: float | None,
) -> tuple[av.VideoFrame | None, list[av.VideoFrame]]:
    """The first decoded frame and any others its packet produced, reading no further, so
    the caller can keep decoding the same stream (`decode_frames`) from where this stopped."""
    try:
        for packet in container.demux(stream):
            _check_deadline(deadline, stage, uri)
            decoded = packet.decode()
            if decoded:
                return decoded[0], list(decoded[1:])
    except av.error.ExitError as err:
        raise VideoError(stage, "timeout", f"{uri}: a read exceeded its time budget") from err
    except av.error.FFmpegError as err:
        raise VideoError(stage, "decode_error", f"{uri}: {err}") from err
    return None, []


def rotation_from_frame(frame: av.VideoFrame) -> int:
    """Clockwise display rotation (0/90/180/270) from the frame's display matrix."""
    counter_clockwise = round(frame.rotation or 0)
    return round(-counter_clockwise / 90.0) * 90 % 360


def apply_rotation(image: np.ndarray, rotation_deg: int) -> np.ndarray:
    """Rotate an (H, W, C) image clockwise by `rotation_deg` for display."""
    if rotation_deg % 360 == 0:
        return image
    # np.rot90 turns counter-clockwise for positive k.
    return np.ascontiguousarray(np.rot90(image, k=-(rotation_deg // 90)))


# ---------------------------------------------------------------------------------------------
# Probe
# ---------------------------------------------------------------------------------------------


@dataclass
class VideoInfo:
    """What the probe learns about a video (one `videos` row minus the pipeline's columns)."""

    video_id: str
    uri: str
    duration_s: float  # seconds
    fps: float  # average frame rate, frames per second
    num_frames: int  # frames in the video stream
    width: int  # display width in pixels, after rotation
    height: int  # display height in pixels, after rotation
    rotation_deg: int  # clockwise display rotation: 0 | 90 | 180 | 270
    orientation: str  # "landscape" | "portrait" | "square", after rotation
    codec: str  # decoder name, e.g. "h264"
    bit_rate: int  # bits per second (0 when unknown)
    has_audio: bool

    @property
    def coded_size(self) -> tuple[int, int]:
        """(width, height) of the decoded pictures, before rotation."""
        if self.rotation_deg in (90, 270):
            return self.height, self.width
        return self.width, self.height


def orientation_for(width: int, height: int) -> str:
    if width > height:
        return "landscape"
    if height > width:
        return "portrait"
    return "square"


def _count_packets(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    uri: str,
    deadline: float | None,
) -> int:
    """Frame count for containers that do not store it: one video packet per frame, counted by
    demuxing only (no decoding), bounded by the deadline."""
    count = 0
    try:
        for packet in container.demux(stream):
            _check_deadline(deadline, "probe", uri)
            if packet.size:
                count += 1
    except av.error.FFmpegError as err:
        raise VideoError("probe", "decode_error", f"{uri}: {err}") from err
    return count


def _check_tail_decodes(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    duration_s: float,
    uri: str,
    deadline: float | None,
) -> None:
    """Seek to the last keyframe and decode one frame: catches files whose header promises
    frames that were never written (a cut-off upload), at the cost of one seek."""
    if stream.time_base is None or duration_s <= 0:
        return
    start_s = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
    target_pts = int((start_s + max(0.0, duration_s - 0.5)) / stream.time_base)
    try:
        container.seek(target_pts, stream=stream, backward=True, any_frame=False)
        for packets_read, packet in enumerate(container.demux(stream)):
            _check_deadline(deadline, "probe", uri)
            if packet.decode():
                return
            if packets_read >= _TAIL_CHECK_MAX_PACKETS:
                break
    except av.error.FFmpegError as err:
        raise VideoError("probe", "truncated", f"{uri}: the end does not decode: {err}") from err
    raise VideoError(
        "probe", "truncated", f"{uri}: no frame decodes near the end ({duration_s:.2f} s)"
    )


def probe(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
) -> VideoInfo:
    """Read the metadata of one video and prove it decodes (first frame and last keyframe).

    Raises VideoError(stage="probe") for anything that would fail later stages.
    """
    deadline = time.monotonic() + timeout_s
    size = input_size_bytes(uri, storage_options)
    if size is None:
        raise VideoError("probe", "not_found", f"{uri}: no such file")
    if size == 0:
        raise VideoError("probe", "empty_file", f"{uri}: the file is empty (0 bytes)")

    with open_container(uri, storage_options, "probe", timeout_s) as container:
        stream = video_stream(container, uri, "probe")
        first_frame = next(decode_frames(container, stream, uri, "probe", deadline), None)
        if first_frame is None:
            raise VideoError("probe", "decode_error", f"{uri}: no video frame decodes")
        num_frames = int(stream.frames) if stream.frames and stream.frames > 0 else 0
        if num_frames == 0:
            container.seek(0)
            num_frames = _count_packets(container, stream, uri, deadline)
        if num_frames <= 0:
            raise VideoError("probe", "decode_error", f"{uri}: the video stream has no frames")
        info = info_from_stream(uri, container, stream, first_frame, num_frames)
        _check_tail_decodes(container, stream, info.duration_s, uri, deadline)
        return info


def info_from_stream(
    uri: str,
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    first_frame: av.VideoFrame,
    num_frames: int,
) -> VideoInfo:
    """A video's metadata from its open container and first decoded frame. `num_frames` is the
    caller's count (the header's, packets counted, or frames decoded); 0 = not known yet."""
    rotation_deg = rotation_from_frame(first_frame)
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if stream.duration and stream.time_base:
        duration_s = float(stream.duration * stream.time_base)
    elif container.duration:
        duration_s = container.duration / av.time_base
    else:
        duration_s = 0.0
    if not rate:
        if duration_s <= 0 or num_frames <= 0:
            raise VideoError("probe", "no_frame_rate", f"{uri}: neither rate nor duration")
        rate = num_frames / duration_s
    fps = float(rate)
    if duration_s <= 0 and num_frames > 0:
        duration_s = num_frames / fps
    coded_w, coded_h = first_frame.width, first_frame.height
    width, height = (coded_h, coded_w) if rotation_deg in (90, 270) else (coded_w, coded_h)
    bit_rate = stream.bit_rate or container.bit_rate or 0
    return VideoInfo(
        video_id=video_id_for(uri),
        uri=uri,
        duration_s=duration_s,
        fps=fps,
        num_frames=num_frames,
        width=width,
        height=height,
        rotation_deg=rotation_deg,
        orientation=orientation_for(width, height),
        codec=stream.codec_context.name,
        bit_rate=int(bit_rate),
        has_audio=bool(container.streams.audio),
    )


# ---------------------------------------------------------------------------------------------
# Sampling frames per clip
# ---------------------------------------------------------------------------------------------


@dataclass
class SamplingConfig:
    """How frames are sampled from each clip, once, for every scorer."""

    frames_per_clip: int = 4  # evenly spaced frames per clip (count)
    motion_gap_frames: int = 2  # distance to each frame's optical-flow pair (frames)
    max_side: int = (
        640  # long side of sampled frames (px): OCR needs readable subtitles; never upscaled
    )
    timeout_s: float = 60.0  # decode budget per video when only sampling (backfill): base (s)
    timeout_per_video_s: float = 1.0  # ... plus this many seconds per second of video
    candidates_per_shot: int = 64  # frames kept per open shot while cuts are unknown (memory)

    def __post_init__(self) -> None:
        if self.frames_per_clip < 1:
            raise ValueError("sampling.frames_per_clip: must be >= 1")
        if self.motion_gap_frames < 1:
            raise ValueError("sampling.motion_gap_frames: must be >= 1")
        if self.max_side < 16:
            raise ValueError("sampling.max_side: must be >= 16 px")
        if self.timeout_s <= 0:
            raise ValueError("sampling.timeout_s: must be > 0 seconds")
        if self.timeout_per_video_s < 0:
            raise ValueError("sampling.timeout_per_video_s: must be >= 0 seconds per second")
        if self.candidates_per_shot < 2:
            raise ValueError("sampling.candidates_per_shot: must be >= 2")

    def budget_s(self, duration_s: float) -> float:
        """Decode budget for sampling a video of `duration_s` seconds."""
        return self.timeout_s + self.timeout_per_video_s * max(0.0, duration_s)


def clip_sample_indices(
    start_frame: int, end_frame: int, cfg: SamplingConfig
) -> list[tuple[int, int]]:
    """(frame, pair frame) per sample for the clip [start_frame, end_frame).

    Samples are spread evenly over the part of the clip whose pair still lies inside it; in a
    clip shorter than the gap the pair is clamped to the clip's last frame.
    """
    if end_frame <= start_frame:
        raise ValueError(f"empty clip [{start_frame}, {end_frame})")
    last = end_frame - 1
    last_start = max(start_frame, last - cfg.motion_gap_frames)
    positions = np.linspace(start_frame, last_start, cfg.frames_per_clip)
    pairs = []
    for position in np.rint(positions).astype(int):
        pairs.append((int(position), min(int(position) + cfg.motion_gap_frames, last)))
    return pairs


def sample_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) with the long side at most `max_side`, aspect kept, even numbers."""
    scale = min(1.0, max_side / max(width, height))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def decode_windows(
    uri: str,
    windows: Sequence[Collection[int]],
    convert: Callable[[av.VideoFrame, int, av.video.stream.VideoStream], T],
    stage: str,
    storage_options: dict[str, Any] | None = None,
    open_timeout_s: float | None = None,
    deadline: float | None = None,
    threads: int = 0,
) -> Iterator[tuple[int, dict[int, T]]]:
    """(window index, {frame index: converted frame}) for windows of frame indices of one
    video, in one sequential decoding pass; each window is yielded as soon as its last frame is
    decoded, and a frame is freed once no later window needs it, so a long film never holds
    more than its open windows. The one window decoder: clip sampling (`iter_clip_frames`) and
    latent preparation both read frames through it.

    Frames are numbered by decoding order, exactly as the split stage counts them (timestamps
    drift on variable-frame-rate files), and only the needed ones are converted:
    `convert(frame, index, stream)` turns one into what the caller keeps. Decoding stops after
    the last needed frame; a video that ends before it raises VideoError(stage, "truncated").
    """
    needs = [set(window) for window in windows]
    if not needs:
        return
    order = sorted(range(len(needs)), key=lambda w: max(needs[w], default=-1))
    users: dict[int, int] = {}
    for needed in needs:
        for frame_index in needed:
            users[frame_index] = users.get(frame_index, 0) + 1
    kept: dict[int, T] = {}
    next_window = 0
    index = -1
    with open_container(uri, storage_options, stage, open_timeout_s, deadline) as container:
        stream = video_stream(container, uri, stage, threads)
        frames = decode_frames(container, stream, uri, stage, deadline)
        while True:
            while next_window < len(order) and max(needs[order[next_window]], default=-1) <= index:
                window = order[next_window]
                yield window, {i: kept[i] for i in needs[window]}
                for i in needs[window]:
                    users[i] -= 1
                    if users[i] == 0:
                        del kept[i]
                next_window += 1
            if next_window == len(order):
                return
            frame = next(frames, None)
            if frame is None:
                break
            index += 1
            if index in users:
                kept[index] = convert(frame, index, stream)
    missing = min(i for i in users if i > index)
    raise VideoError(
        stage, "truncated", f"{uri}: only {index + 1} frames decode, frame {missing} is missing"
    )


def iter_clip_frames(
    uri: str,
    info: VideoInfo,
    clips: list[tuple[int, int]],
    cfg: SamplingConfig,
    storage_options: dict[str, Any] | None = None,
    deadline: float | None = None,
    pairs: list[list[tuple[int, int]]] | None = None,
    threads: int = 0,
) -> Iterator[tuple[int, ClipFrames]]:
    """(clip index, sampled frames) for every clip of one video, in one sequential decoding
    pass (`decode_windows`), yielded as soon as a clip's last needed frame is decoded (its
    frames are then freed), so a long film never holds all its sampled frames at once.

    Why sequential rather than seeking: frame numbers are counted exactly as the split stage
    counts them (decoded frames, not timestamps, which drift on variable-frame-rate files), and
    only the needed frames are converted to RGB, which is where the time goes after decoding.
    `pairs` gives each clip's (frame, pair frame) indices explicitly (those the streaming pass
    recorded in `sample_frames`/`sample_pairs`); by default they follow `clip_sample_indices`.
    """
    if deadline is None:
        deadline = time.monotonic() + cfg.budget_s(info.duration_s)
    per_clip = pairs or [clip_sample_indices(start, end, cfg) for start, end in clips]
    coded_w, coded_h = info.coded_size
    out_w, out_h = sample_size(coded_w, coded_h, cfg.max_side)
    reformatter = VideoReformatter()  # keeps one swscale context for the whole video
    start_s: list[float] = []  # the stream's start time, read once the stream is open

    def convert(
        frame: av.VideoFrame, index: int, stream: av.video.stream.VideoStream
    ) -> tuple[np.ndarray, float]:
        if not start_s:
            start_s.append(stream_start_s(stream))
        rgb = frame_to_array(frame, out_w, out_h, "rgb24", reformatter)
        return apply_rotation(rgb, info.rotation_deg), frame_time_s(
            frame, start_s[0], index, info.fps
        )

    windows = [{i for pair in clip_pairs for i in pair} for clip_pairs in per_clip]
    for clip, decoded in decode_windows(
        uri, windows, convert, "sample", storage_options, cfg.timeout_s, deadline, threads
    ):
        images = {i: image for i, (image, _) in decoded.items()}
        times = {i: time_s for i, (_, time_s) in decoded.items()}
        yield clip, clip_frames_from(per_clip[clip], images, times)


def stream_start_s(stream: av.video.stream.VideoStream) -> float:
    """Presentation time of the stream's first frame (seconds)."""
    return float(stream.start_time * stream.time_base) if stream.start_time else 0.0


def frame_time_s(frame: av.VideoFrame, start_s: float, index: int, fps: float) -> float:
    """Seconds from the start of the video to this frame (its timestamp; index / fps when the
    container gives none)."""
    return float(frame.time) - start_s if frame.time is not None else index / fps


def clip_frames_from(
    pairs: list[tuple[int, int]], images: dict[int, np.ndarray], times: dict[int, float]
) -> ClipFrames:
    """One clip's ClipFrames from decoded images by frame index."""
    frames = np.stack([images[first] for first, _ in pairs])  # (K, H, W, 3)
    pair_frames = np.stack([images[second] for _, second in pairs])  # (K, H, W, 3)
    times_s = np.array([times[first] for first, _ in pairs], dtype=np.float64)
    pair_dt_s = np.array([times[second] - times[first] for first, second in pairs])
    return ClipFrames(frames, times_s, pair_frames, pair_dt_s)


def sample_clip_frames(
    uri: str,
    info: VideoInfo,
    clips: list[tuple[int, int]],
    cfg: SamplingConfig,
    storage_options: dict[str, Any] | None = None,
    deadline: float | None = None,
) -> list[ClipFrames]:
    """Sampled frames for every clip of one video, all at once (see `iter_clip_frames`)."""
    out: dict[int, ClipFrames] = dict(
        iter_clip_frames(uri, info, clips, cfg, storage_options, deadline)
    )
    return [out[c] for c in range(len(clips))]


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: int = 25,
    rotation_deg: int = 0,
    crf: int = 18,
    frame_gaps_ms: Sequence[int] | None = None,
) -> Path:
    """Encode RGB uint8 frames (H, W, 3) to H.264 mp4.

    rotation_deg: clockwise display rotation stored in the display matrix (not applied to the
    pixels), the way phones store portrait video.
    frame_gaps_ms: milliseconds from each frame to the next, a variable frame rate as phones
    record it (None: 1 / fps apart).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # moov atom first for mp4/mov (streamable); other containers have no such option.
    options = {"movflags": "faststart"} if path.suffix in (".mp4", ".mov") else {}
    container = av.open(str(path), mode="w", options=options)
    try:
        stream = None
        pts_ms = 0
        for index, image in enumerate(frames):
            if stream is None:
                height, width = image.shape[:2]
                stream = container.add_stream("libx264", rate=fps)
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                # A fixed GOP and no threads keep the output byte-identical run to run.
                stream.options = {"crf": str(crf), "g": str(2 * fps), "threads": "1"}
                if rotation_deg:
                    # PyAV's angle is counter-clockwise (as read back in VideoFrame.rotation).
                    stream.set_display_rotation(-rotation_deg)
                if frame_gaps_ms is not None:
                    stream.codec_context.time_base = Fraction(1, 1000)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if frame_gaps_ms is not None:
                frame.pts, frame.time_base = pts_ms, Fraction(1, 1000)
                pts_ms += frame_gaps_ms[index]
            container.mux(stream.encode(frame))
        if stream is None:
            raise ValueError("write_video: no frames")
        container.mux(stream.encode(None))
    finally:
        container.close()
    return path
