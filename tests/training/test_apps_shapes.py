"""The measuring helpers of the applications (training/shapes.py) on videos with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from training.shapes import (
    ShapeSpec,
    colour_centroids,
    direction_consistent,
    midpoint_errors,
    midpoint_hits,
    render,
)


def test_linear_motion_puts_every_frame_at_its_neighbours_midpoint() -> None:
    """Rendered frames move linearly: each inner frame's centroid is within rasterisation error
    (well under 1 px) of its neighbours' midpoint; a frame copied from its neighbour is off by
    a whole step (travel 0.65 of 32 px over 6 frames: about 3.5 px, over the 2 px tolerance)."""
    spec = ShapeSpec("red", "circle", "right", seed=3)
    frames = render(spec, 7, 32, travel=0.65)
    errors = midpoint_errors(frames, "red", [1, 2, 3, 4, 5])
    assert len(errors) == 5 and max(errors) < 0.7
    assert all(midpoint_hits(frames, "red", [1, 3, 5]))
    copied = frames.copy()
    copied[3] = copied[2]
    step = colour_centroids(frames, "red")[3][0] - colour_centroids(frames, "red")[2][0]
    error = midpoint_errors(copied, "red", [3])[0]
    assert error == pytest.approx(step, abs=0.7) and error > 2.0
    assert midpoint_hits(copied, "red", [3]) == [False]
    # The last frame has no right neighbour (a TUP window's last frame): it is not scored.
    assert midpoint_errors(frames, "red", [6]) == []


def test_a_missing_shape_is_a_miss_not_a_skip() -> None:
    frames = render(ShapeSpec("blue", "square", "down", seed=1), 5, 32)
    frames[2] = frames[0].copy()
    frames[2][...] = 128  # no blue pixel at all
    assert midpoint_errors(frames, "blue", [2]) == [None]
    assert midpoint_hits(frames, "blue", [2]) == [False]


def test_direction_consistent_needs_the_direction_in_every_part() -> None:
    """A long video that goes right all the way passes; one that goes right then back left
    half-way (net still right) fails, as a drifting rollout would."""
    spec = ShapeSpec("green", "triangle", "right", seed=5)
    video = render(spec, 40, 32, travel=0.65)
    assert direction_consistent(video, "green", "right")
    assert not direction_consistent(video, "green", "left")
    back = np.concatenate([video[:30], video[30:20:-1]])  # right for 30 frames, then 10 back
    from training.shapes import measure_direction

    assert measure_direction(back, "green") == "right"
    assert not direction_consistent(back, "green", "right", segments=4)


def test_travel_must_fit_the_frame() -> None:
    with pytest.raises(ValueError, match="travel"):
        render(ShapeSpec("red", "circle", "left", seed=0), 4, 32, travel=0.9)
