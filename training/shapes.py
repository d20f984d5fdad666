"""The synthetic "moving shapes" world of `make train-demo`, and the measuring code for it.

Each video shows one coloured shape (circle, square or triangle) gliding in one of four
directions over a mild random texture; its caption names colour, shape and direction
("a red circle moving left"). Generated samples are judged automatically:

- colour: the prototype colour with the most confidently matching pixels over all frames;
- direction: the track of that colour's centroid from the first to the last frame, which must
  cover at least `MIN_TRAVEL` of the frame along the dominant axis to count as motion.

The measuring functions are plain numpy and are tested on videos with known answers.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {  # (dx, dy) in image axes (y points down)
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
# Every word a caption uses (the tiny text encoder makes each one token, like CLIP's BPE).
CAPTION_WORDS = ("a", "moving", *COLOURS, *SHAPES, *DIRECTIONS)
TRAVEL = 0.5  # the shape travels half the frame over the clip (the issue asks >= a quarter)
MIN_TRAVEL = 0.125  # measured travel below this fraction of the frame is "no motion"
COLOUR_MATCH = 60.0  # max RGB distance for a pixel to count as a prototype colour


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    direction: str
    seed: int

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"


def all_specs(num_videos: int, seed: int = 0) -> list[ShapeSpec]:
    """Balanced specs: every (colour, direction) pair equally often, shapes cycling."""
    specs = []
    combos = [(c, d) for c in COLOURS for d in DIRECTIONS]
    for i in range(num_videos):
        colour, direction = combos[i % len(combos)]
        specs.append(
            ShapeSpec(colour, SHAPES[(i // len(combos)) % len(SHAPES)], direction, seed + i)
        )
    return specs


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A low-saturation grey texture (blurred noise), so no pixel looks like a prototype."""
    coarse = rng.uniform(70, 150, size=(size // 8 + 1, size // 8 + 1))
    grid = np.kron(coarse, np.ones((8, 8)))[:size, :size]
    fine = rng.normal(0, 6, size=(size, size))
    grey = np.clip(grid + fine, 0, 255)
    return np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)


def _shape_mask(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
    if shape == "square":
        return (np.abs(xx - cx) <= radius * 0.9) & (np.abs(yy - cy) <= radius * 0.9)
    # Triangle pointing up: inside three half-planes.
    top = cy - radius
    bottom = cy + radius * 0.8
    half_width = (yy - top) / (bottom - top) * radius * 1.1
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)


def render(spec: ShapeSpec, num_frames: int, size: int, travel: float = TRAVEL) -> np.ndarray:
    """(T, size, size, 3) uint8 frames of one spec (deterministic in `spec.seed`); the shape
    covers `travel` of the frame over the clip (at most 1 - 0.28 - 2 / size: it stays inside)."""
    rng = np.random.default_rng(spec.seed)
    background = _texture(size, rng)
    radius = size * 0.14
    if not 0.0 <= travel * size <= size - 2 * (radius + 1):
        raise ValueError(f"travel: {travel} of the frame does not fit a {size} px frame")
    travel = travel * size
    dx, dy = DIRECTIONS[spec.direction]
    # Start so the whole path stays inside the frame, with some random slack.
    margin = radius + 1
    span = size - 2 * margin
    start = []
    for d in (dx, dy):
        if d > 0:
            start.append(margin + rng.uniform(0, max(span - travel, 0)))
        elif d < 0:
            start.append(size - margin - rng.uniform(0, max(span - travel, 0)))
        else:
            start.append(margin + rng.uniform(0, span))
    colour = np.array(COLOURS[spec.colour], dtype=np.uint8)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        step = travel * t / max(num_frames - 1, 1)
        mask = _shape_mask(spec.shape, size, start[0] + dx * step, start[1] + dy * step, radius)
        frame = background.copy()
        frame[mask] = colour
        frames[t] = frame
    return frames


def write_dataset(
    out_dir: str | Path,
    specs: list[ShapeSpec],
    num_frames: int,
    size: int,
    fps: int,
    travel: float = TRAVEL,
) -> list[Path]:
    """Videos plus same-stem `.txt` captions (the data engine's sidecar caption source) and a
    `specs.jsonl` manifest with the ground truth (`travel`: see `render`)."""
    from data_engine.video import write_video

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with open(out_dir / "specs.jsonl", "w") as manifest:
        for i, spec in enumerate(specs):
            path = out_dir / f"{i:04d}_{spec.colour}_{spec.shape}_{spec.direction}.mp4"
            write_video(path, list(render(spec, num_frames, size, travel)), fps=fps)
            path.with_suffix(".txt").write_text(spec.caption + "\n")
            manifest.write(json.dumps({"path": str(path), **spec.__dict__}) + "\n")
            paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------
# Measuring generated videos
# ------------------------------------------------------------------------------------------


def colour_masks(frames: np.ndarray) -> dict[str, np.ndarray]:
    """{colour: (T, H, W) bool} pixels within COLOUR_MATCH of each prototype colour."""
    pixels = frames.astype(np.float32)
    return {
        name: np.linalg.norm(pixels - np.array(rgb, np.float32), axis=-1) < COLOUR_MATCH
        for name, rgb in COLOURS.items()
    }


def measure_colour(frames: np.ndarray) -> str | None:
    """The prototype colour covering the most pixels over the video (None if none does)."""
    counts = {name: int(mask.sum()) for name, mask in colour_masks(frames).items()}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else None


def _centroid(mask: np.ndarray) -> tuple[float, float] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return float(xs.mean()), float(ys.mean())


def measure_direction(frames: np.ndarray, colour: str | None = None) -> str | None:
    """Direction of the shape's travel from the first to the last frame in which it is seen,
    or None when it moves less than MIN_TRAVEL of the frame."""
    colour = colour or measure_colour(frames)
    if colour is None:
        return None
    mask = colour_masks(frames)[colour]
    points = [c for c in (_centroid(m) for m in mask) if c is not None]
    if len(points) < 2:
        return None
    (x0, y0), (x1, y1) = points[0], points[-1]
    dx, dy = x1 - x0, y1 - y0
    size = frames.shape[2] if abs(dx) >= abs(dy) else frames.shape[1]
    if max(abs(dx), abs(dy)) < MIN_TRAVEL * size:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def measure_colour_kept(frames: np.ndarray, expected: str) -> bool:
    """TI2V: the last frame still shows the first frame's colour as its dominant prototype."""
    return measure_colour(frames[-1:]) == expected


def colour_centroids(frames: np.ndarray, colour: str) -> list[tuple[float, float] | None]:
    """(x, y) centroid in pixels of `colour`'s matching pixels in each frame (None where the
    colour is absent)."""
    return [_centroid(m) for m in colour_masks(frames)[colour]]


def midpoint_errors(frames: np.ndarray, colour: str, filled: list[int]) -> list[float | None]:
    """Interpolation / TUP: for each filled frame i with both neighbours in the video, the
    distance in pixels from its centroid to the midpoint of frames i-1 and i+1's centroids
    (linear motion puts it there). None where a centroid is missing; filled frames without two
    neighbours (the last frame of a TUP window) are skipped."""
    points = colour_centroids(frames, colour)
    errors: list[float | None] = []
    for i in filled:
        if i <= 0 or i >= len(points) - 1:
            continue
        here, before, after = points[i], points[i - 1], points[i + 1]
        if here is None or before is None or after is None:
            errors.append(None)
            continue
        mid_x, mid_y = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        errors.append(float(np.hypot(here[0] - mid_x, here[1] - mid_y)))
    return errors


MIDPOINT_TOLERANCE_PX = 2.0  # the interpolation test's bound on a filled frame's centroid


def midpoint_hits(
    frames: np.ndarray, colour: str, filled: list[int], tolerance_px: float = MIDPOINT_TOLERANCE_PX
) -> list[bool]:
    """Per scored filled frame: its centroid lies within `tolerance_px` of its neighbours'
    midpoint (a missing centroid is a miss)."""
    return [e is not None and e <= tolerance_px for e in midpoint_errors(frames, colour, filled)]


def direction_consistent(frames: np.ndarray, colour: str, expected: str, segments: int = 2) -> bool:
    """Long video: the shape moves in `expected` over the whole video and over each of
    `segments` equal consecutive parts of it (a rollout that turns or stalls half-way fails)."""
    if measure_direction(frames, colour) != expected:
        return False
    bounds = np.linspace(0, len(frames), segments + 1).round().astype(int)
    return all(
        measure_direction(frames[a:b], colour) == expected for a, b in itertools.pairwise(bounds)
    )
