"""The train-demo's measuring code, on videos with known answers."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from training.shapes import (
    ShapeSpec,
    all_specs,
    measure_colour,
    measure_colour_kept,
    measure_direction,
    render,
    write_dataset,
)


def test_measures_every_colour_and_direction_of_rendered_videos() -> None:
    """Ground truth in, the same labels out: the accuracy figures of the demo mean something."""
    for spec in all_specs(48, seed=3):
        frames = render(spec, num_frames=8, size=32)
        assert measure_colour(frames) == spec.colour, spec
        assert measure_direction(frames) == spec.direction, spec


def test_survives_h264_round_trip(tmp_path: Path) -> None:
    """Videos written through the encoder (what the data engine curates) still measure right,
    and each carries its caption in a sidecar file."""
    specs = all_specs(8, seed=11)
    paths = write_dataset(tmp_path, specs, num_frames=16, size=64, fps=8)
    for spec, path in zip(specs, paths):
        with av.open(str(path)) as container:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        assert frames.shape == (16, 64, 64, 3)
        assert measure_colour(frames) == spec.colour
        assert measure_direction(frames) == spec.direction
        assert path.with_suffix(".txt").read_text().strip() == spec.caption


def test_no_motion_and_no_shape_are_not_counted() -> None:
    """A shape that stays put (or a blank video) has no direction: motion must be real."""
    frames = render(ShapeSpec("red", "circle", "left", seed=0), num_frames=8, size=32)
    still = np.repeat(frames[:1], 8, axis=0)
    assert measure_direction(still) is None
    blank = np.full((8, 32, 32, 3), 110, dtype=np.uint8)
    assert measure_colour(blank) is None and measure_direction(blank) is None


def test_colour_kept_compares_the_last_frame() -> None:
    """TI2V: a video whose shape turns blue by the end does not keep a red first frame."""
    red = render(ShapeSpec("red", "square", "up", seed=1), num_frames=8, size=32)
    blue = render(ShapeSpec("blue", "square", "up", seed=1), num_frames=8, size=32)
    assert measure_colour_kept(red, "red")
    mixed = np.concatenate([red[:4], blue[4:]])
    assert not measure_colour_kept(mixed, "red")
