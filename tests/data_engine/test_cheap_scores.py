"""Motion and clarity scores (data_engine/cheap_scores.py) on videos with known truth."""

from __future__ import annotations

import numpy as np
import pytest

from data_engine.cheap_scores import clarity_score, motion_score, provenance
from data_engine.frames import ClipFrames
from data_engine.video import SamplingConfig, probe, sample_clip_frames
from demos import samples

CFG = SamplingConfig(frames_per_clip=3, motion_gap_frames=2, max_side=320)


def _clip(path) -> ClipFrames:
    info = probe(str(path))
    (clip,) = sample_clip_frames(str(path), info, [(0, info.num_frames)], CFG)
    return clip


def test_static_clip_scores_far_below_moving(tmp_path):
    """Filtering "no motion" clips needs a clear gap: an identical-frame clip must score near
    zero and far below a panning camera with a moving object."""
    static = motion_score(_clip(samples.write_static_video(tmp_path / "s.mp4", num_frames=30)))
    moving = motion_score(
        _clip(samples.write_moving_shape_video(tmp_path / "m.mp4", num_frames=30, pan_px=2.0))
    )
    assert static < 0.2
    assert moving > 5.0
    assert static < 0.05 * moving


def test_blurred_clip_scores_far_below_sharp(tmp_path):
    """Out-of-focus footage must be separable: the same content under a Gaussian blur must
    score clearly lower on clarity."""
    sharp = clarity_score(
        _clip(samples.write_moving_shape_video(tmp_path / "a.mp4", num_frames=20))
    )
    blurred = clarity_score(_clip(samples.write_blurred_video(tmp_path / "b.mp4", num_frames=20)))
    assert blurred < 0.25 * sharp


def test_motion_unit_is_resolution_and_frame_rate_invariant(tmp_path):
    """motion_score is in percent of the short side per second, so the same scene motion must
    score about the same at 320x240 and 640x480 (pixel speed doubled), and at 25 and 50 fps
    (pixel speed per frame halved)."""
    pan = dict(num_frames=30)
    small = motion_score(
        _clip(samples.write_moving_shape_video(tmp_path / "s.mp4", speed_px=3, pan_px=2, **pan))
    )
    large = motion_score(
        _clip(
            samples.write_moving_shape_video(
                tmp_path / "l.mp4", size=(640, 480), speed_px=6, pan_px=4, **pan
            )
        )
    )
    fast_fps = motion_score(
        _clip(
            samples.write_moving_shape_video(
                tmp_path / "f.mp4", speed_px=1.5, pan_px=1, fps=50, num_frames=60
            )
        )
    )
    assert large == pytest.approx(small, rel=0.25)
    assert fast_fps == pytest.approx(small, rel=0.25)


def test_motion_refuses_clips_without_pairs():
    """A clip sampled without pair frames (or with zero time gaps) has no motion estimate:
    it must raise, not report 0 (which would read as "static")."""
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    no_pairs = ClipFrames(frames, np.zeros(2), np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0))
    with pytest.raises(ValueError):
        motion_score(no_pairs)
    zero_gap = ClipFrames(frames, np.zeros(2), frames.copy(), np.zeros(2))
    with pytest.raises(ValueError):
        motion_score(zero_gap)


def test_provenance_names_method_unit_and_resolution():
    """Scores are stored with what produced them so two versions are never mixed."""
    record = provenance()
    assert record["motion_score"]["unit"] == "percent_short_side_per_s"
    assert record["clarity_score"]["short_side_px"] > 0
