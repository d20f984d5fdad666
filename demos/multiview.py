"""Multi-view renders of coloured solids in Zero123++'s camera layout (STIV's multi-view mode).

STIV's multi-view application is a TI2V model whose frame 0 is the input image and whose next
six frames are six novel views of the same object; temporal attention alone carries the
cross-view consistency. This module makes that data on the CPU, with exact ground truth:

- objects: a cube, a square pyramid, a triangular prism and an octahedron, every face its
  own colour (two named hues, each in several shades), flat shaded with a mild Lambert term;
- cameras: the input view at the object's own (azimuth, elevation), then Zero123++ v1.2's six
  views: azimuths +30, +90, ... +330 degrees relative to the input, absolute elevations
  alternating +20 and -10 degrees, one distance, one field of view (`VIEW_POSES`);
- a plain background of one known colour, so `silhouette` recovers the object's mask from
  rendered frames exactly and from generated (noisy) frames by a colour-distance threshold.

Rendering is a numpy rasteriser: perspective projection, back faces culled, a z-buffer over
the rest (interpolated 1/depth, exact for planar faces). `write_dataset` writes one 7-frame
MP4 per object with a same-stem `.txt` caption (the data engine's sidecar caption source), a
same-stem `.json` with the spec and poses, and a `specs.jsonl` manifest (docs/multiview.md).

    python -m demos.multiview OUT_DIR --objects 24 --size 64
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------
# Camera layout
# ---------------------------------------------------------------------------------------------

# Zero123++ v1.2's six target views: (azimuth offset from the input view, absolute elevation),
# both in degrees. v1.1 used relative elevations (+30, -20); v1.2 fixed them to +20 and -10.
VIEW_POSES: tuple[tuple[float, float], ...] = (
    (30.0, 20.0),
    (90.0, -10.0),
    (150.0, 20.0),
    (210.0, -10.0),
    (270.0, 20.0),
    (330.0, -10.0),
)
NUM_FRAMES = 1 + len(VIEW_POSES)  # the input view, then the six novel views
FOV_DEG = 30.0  # vertical = horizontal field of view (square frames), Zero123++ v1.2's
CAMERA_DISTANCE = 4.5  # camera to object centre (object radii): the unit sphere spans ~85%
INPUT_ELEVATION_RANGE = (0.0, 30.0)  # input views are drawn with elevations in this range (deg)
LIGHT_DIRECTION = (0.4, 1.0, 0.6)  # towards the light, world axes (y up); fixed to the object
AMBIENT, DIFFUSE = 0.7, 0.3  # shade = AMBIENT + DIFFUSE * max(0, n . l): faces keep their hue

# ---------------------------------------------------------------------------------------------
# Objects, palettes, captions
# ---------------------------------------------------------------------------------------------

BACKGROUND: tuple[int, int, int] = (240, 240, 240)  # RGB of every pixel the object leaves
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (230, 210, 40),
}
# Face i gets hue i % 2 of its palette at shade FACE_SHADES[i // 2]: every face of every
# solid (at most 8) has its own colour, and both hues appear on every object.
FACE_SHADES = (1.0, 0.78, 0.58, 0.42)
SHAPES = ("cube", "pyramid", "prism", "octahedron")
PALETTES = tuple(f"{a}-{b}" for a, b in itertools.combinations(COLOURS, 2))  # "red-green", ...
# Every word a caption uses ("a red and blue cube"): the tiny text encoder needs one token each.
MULTIVIEW_CAPTION_WORDS: tuple[str, ...] = ("a", "and", *COLOURS, *SHAPES)
# RGB distance to BACKGROUND above which a pixel is object: half the smallest distance of any
# face colour (every shade, lit or not) to the background (202, the lit bright yellow), so
# generated frames may be off by up to ~100 per pixel and still segment correctly.
SILHOUETTE_THRESHOLD = 80.0


@dataclass(frozen=True)
class ObjectSpec:
    """One object and the pose of its input view."""

    shape: str  # one of SHAPES
    palette: str  # one of PALETTES: "<hue>-<hue>", the two hues its faces are shaded from
    seed: int  # the seed its input pose was drawn with (recorded for provenance)
    input_azimuth: float  # azimuth of the input view (deg); the six views are relative to it
    input_elevation: float  # elevation of the input view (deg, positive looks down on it)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape: {self.shape!r} is not one of {', '.join(SHAPES)}")
        if self.palette not in PALETTES:
            raise ValueError(f"palette: {self.palette!r} is not one of {', '.join(PALETTES)}")
        if not -90.0 < self.input_elevation < 90.0:
            raise ValueError("input_elevation: must be strictly between -90 and 90 degrees")

    @property
    def hues(self) -> tuple[str, str]:
        first, second = self.palette.split("-")
        return first, second

    @property
    def caption(self) -> str:
        first, second = self.hues
        return f"a {first} and {second} {self.shape}"


def _solid(shape: str) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """(V, 3) vertices and faces (vertex indices, any winding) of a solid before scaling."""
    if shape == "cube":
        vertices = [(x, y, z) for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]
        # Opposite faces are consecutive (+x, -x, +y, -y, -z, +z), so they differ in hue, and
        # every corner shows both hues.
        faces = [(4, 5, 7, 6), (0, 1, 3, 2), (2, 3, 7, 6), (0, 1, 5, 4), (0, 2, 6, 4), (1, 3, 7, 5)]
        return np.array(vertices, float), faces
    if shape == "pyramid":
        base = [(-1, -0.6, -1), (1, -0.6, -1), (1, -0.6, 1), (-1, -0.6, 1)]
        vertices = [*base, (0, 1.0, 0)]
        faces = [(0, 1, 4), (1, 2, 4), (2, 3, 4), (3, 0, 4), (0, 1, 2, 3)]
        return np.array(vertices, float), faces
    if shape == "prism":
        # Triangular cross-section in the ground plane, axis vertical.
        angles = np.deg2rad([90.0, 210.0, 330.0])
        ring = [(math.cos(a), math.sin(a)) for a in angles]
        vertices = [(x, y, z) for y in (-0.8, 0.8) for x, z in ring]
        faces = [(0, 1, 4, 3), (1, 2, 5, 4), (2, 0, 3, 5), (3, 4, 5), (0, 1, 2)]  # sides, caps
        return np.array(vertices, float), faces
    if shape == "octahedron":
        vertices = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
        faces = [(x, y, z) for x in (0, 1) for y in (2, 3) for z in (4, 5)]
        return np.array(vertices, float), faces
    raise ValueError(f"shape: {shape!r} is not one of {', '.join(SHAPES)}")


@cache
def _mesh(shape: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Triangles (F, 3, 3) in a unit sphere, each triangle's face index (F,), and each
    triangle's outward unit normal (F, 3). Faces are wound outward here, whatever their order
    in `_solid`: every solid is convex around the origin."""
    vertices, faces = _solid(shape)
    vertices = vertices - (vertices.max(axis=0) + vertices.min(axis=0)) / 2
    vertices = vertices / np.linalg.norm(vertices, axis=1).max()
    triangles, face_ids, normals = [], [], []
    for face_id, face in enumerate(faces):
        polygon = vertices[list(face)]
        normal = np.cross(polygon[1] - polygon[0], polygon[2] - polygon[0])
        normal /= np.linalg.norm(normal)
        if normal @ polygon.mean(axis=0) < 0:
            normal = -normal
        for k in range(1, len(polygon) - 1):  # fan; polygons are convex
            triangles.append(polygon[[0, k, k + 1]])
            face_ids.append(face_id)
            normals.append(normal)
    return np.array(triangles), np.array(face_ids), np.array(normals)


def face_colours(shape: str, palette: str) -> np.ndarray:
    """(num_faces, 3) float RGB of each face before lighting."""
    num_faces = len(_solid(shape)[1])
    hues = [np.array(COLOURS[name], float) for name in palette.split("-")]
    return np.array([hues[i % 2] * FACE_SHADES[i // 2] for i in range(num_faces)])


# ---------------------------------------------------------------------------------------------
# Cameras and rasterising
# ---------------------------------------------------------------------------------------------


def poses(spec: ObjectSpec) -> list[dict[str, float]]:
    """The 7 absolute camera poses: the input view, then VIEW_POSES relative to it. Keys:
    azimuth (deg, in [0, 360)), elevation (deg), distance (object radii), fov (deg)."""
    views = [(spec.input_azimuth, spec.input_elevation)]
    views += [(spec.input_azimuth + offset, elevation) for offset, elevation in VIEW_POSES]
    return [
        {
            "azimuth": round(float(azimuth % 360.0), 6),  # 19.3, not 19.300000000000011
            "elevation": float(elevation),
            "distance": CAMERA_DISTANCE,
            "fov": FOV_DEG,
        }
        for azimuth, elevation in views
    ]


def camera_frame(azimuth: float, elevation: float) -> tuple[np.ndarray, np.ndarray]:
    """Camera centre (3,) and world-to-camera rotation (3, 3) whose rows are right, up and
    forward. World axes: y up; azimuth 0 looks from +z, azimuth 90 from +x (counter-clockwise
    seen from above); positive elevation looks down on the object."""
    az, el = math.radians(azimuth % 360.0), math.radians(elevation)
    centre = CAMERA_DISTANCE * np.array(
        [math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)]
    )
    forward = -centre / np.linalg.norm(centre)
    right = np.cross(forward, (0.0, 1.0, 0.0))
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return centre, np.stack([right, up, forward])


def render_view(
    shape: str, palette: str, azimuth: float, elevation: float, size: int
) -> np.ndarray:
    """(size, size, 3) uint8: one view of a solid on BACKGROUND, no anti-aliasing (the
    silhouette is exactly the set of non-background pixels)."""
    triangles, face_ids, normals = _mesh(shape)
    centre, rotation = camera_frame(azimuth, elevation)
    light = np.array(LIGHT_DIRECTION) / np.linalg.norm(LIGHT_DIRECTION)
    shade = AMBIENT + DIFFUSE * np.clip(normals @ light, 0.0, None)  # (F,)
    colours = np.clip(face_colours(shape, palette)[face_ids] * shade[:, None], 0, 255)
    colours = np.rint(colours).astype(np.uint8)  # (F, 3)
    # Back faces never show on a convex solid; the z-buffer still orders the rest.
    visible = np.einsum("fj,fj->f", normals, centre - triangles[:, 0]) > 0

    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUND
    inv_depth_buffer = np.zeros((size, size))  # 1 / depth of the nearest surface; 0 = nothing
    focal_px = size / 2 / math.tan(math.radians(FOV_DEG) / 2)
    for triangle, colour in zip(triangles[visible], colours[visible]):
        camera = (triangle - centre) @ rotation.T  # (3 vertices, xyz) in camera space
        depth = camera[:, 2]
        xs = size / 2 + focal_px * camera[:, 0] / depth  # pixels, right
        ys = size / 2 - focal_px * camera[:, 1] / depth  # pixels, down
        x0, x1 = max(0, math.floor(xs.min())), min(size, math.ceil(xs.max()) + 1)
        y0, y1 = max(0, math.floor(ys.min())), min(size, math.ceil(ys.max()) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        px, py = np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5)  # pixel centres
        area = (xs[1] - xs[0]) * (ys[2] - ys[0]) - (xs[2] - xs[0]) * (ys[1] - ys[0])
        if abs(area) < 1e-12:
            continue  # seen edge-on
        # Barycentric weights of each pixel centre (edge functions over the signed area).
        w0 = ((xs[1] - px) * (ys[2] - py) - (xs[2] - px) * (ys[1] - py)) / area
        w1 = ((xs[2] - px) * (ys[0] - py) - (xs[0] - px) * (ys[2] - py)) / area
        w2 = 1.0 - w0 - w1
        inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
        # 1/depth is linear in screen space for a planar triangle (perspective-correct).
        inv_depth = w0 / depth[0] + w1 / depth[1] + w2 / depth[2]
        region = inv_depth_buffer[y0:y1, x0:x1]
        nearer = inside & (inv_depth > region)
        region[nearer] = inv_depth[nearer]
        image[y0:y1, x0:x1][nearer] = colour
    return image


def render_views(spec: ObjectSpec, size: int) -> np.ndarray:
    """(7, size, size, 3) uint8: frame 0 the input view, frames 1..6 VIEW_POSES in order."""
    if size < 8:
        raise ValueError(f"size: must be >= 8 px, got {size}")
    return np.stack(
        [
            render_view(spec.shape, spec.palette, pose["azimuth"], pose["elevation"], size)
            for pose in poses(spec)
        ]
    )


# ---------------------------------------------------------------------------------------------
# Measuring views
# ---------------------------------------------------------------------------------------------


def silhouette(frames: np.ndarray) -> np.ndarray:
    """(..., H, W) bool object masks of (..., H, W, 3) RGB frames: pixels farther than
    SILHOUETTE_THRESHOLD (Euclidean RGB) from BACKGROUND. Works on rendered, decoded and
    generated frames alike."""
    distance = np.linalg.norm(frames.astype(np.float32) - np.array(BACKGROUND, np.float32), axis=-1)
    return distance > SILHOUETTE_THRESHOLD


def silhouette_iou(a_frames: np.ndarray, b_frames: np.ndarray) -> np.ndarray:
    """(T,) intersection over union of the two videos' silhouettes, view by view ((T, H, W, 3)
    each, same shape). Two empty silhouettes agree: IoU 1."""
    if a_frames.shape != b_frames.shape:
        raise ValueError(f"frame shapes differ: {a_frames.shape} vs {b_frames.shape}")
    a, b = silhouette(a_frames), silhouette(b_frames)
    intersection = (a & b).sum(axis=(-2, -1))
    union = (a | b).sum(axis=(-2, -1))
    return np.where(union > 0, intersection / np.maximum(union, 1), 1.0)


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


def held_out_combinations(seed: int) -> list[tuple[str, str]]:
    """One (shape, palette) per shape, each with a different palette, never used for training:
    every shape and every hue still appears in training, only the combination is new."""
    palettes = np.random.default_rng(seed).permutation(len(PALETTES))
    return [(shape, PALETTES[int(palettes[i])]) for i, shape in enumerate(SHAPES)]


def _specs(combinations: Sequence[tuple[str, str]], count: int, seed: int) -> list[ObjectSpec]:
    """`count` objects cycling over `combinations`, each with its own random input pose."""
    specs = []
    for i in range(count):
        shape, palette = combinations[i % len(combinations)]
        object_seed = seed + i
        rng = np.random.default_rng(object_seed)
        azimuth = float(np.round(rng.uniform(0.0, 360.0), 1))
        elevation = float(np.round(rng.uniform(*INPUT_ELEVATION_RANGE), 1))
        specs.append(ObjectSpec(shape, palette, object_seed, azimuth, elevation))
    return specs


def specs_split(
    num_train: int, num_held_out: int, seed: int = 0
) -> tuple[list[ObjectSpec], list[ObjectSpec]]:
    """(train, held_out) objects: held-out objects are (shape, palette) combinations that no
    training object has (`held_out_combinations`); training cycles over all the others."""
    if num_train < 0 or num_held_out < 0:
        raise ValueError("num_train and num_held_out must be >= 0")
    held = held_out_combinations(seed)
    train_combos = [c for c in itertools.product(SHAPES, PALETTES) if c not in held]
    rng = np.random.default_rng(seed)
    train_combos = [train_combos[int(i)] for i in rng.permutation(len(train_combos))]
    # Seeds of the two sets never collide, so no held-out object repeats a training pose.
    train = _specs(train_combos, num_train, seed * 1_000_003)
    held_out = _specs(held, num_held_out, seed * 1_000_003 + 500_000)
    return train, held_out


def write_dataset(
    out_dir: str | Path, specs: Sequence[ObjectSpec], size: int = 64, fps: int = 7
) -> list[Path]:
    """One 7-frame MP4 per object plus a same-stem `.txt` caption (the data engine's sidecar
    caption source) and `.json` (spec, caption, poses), and a `specs.jsonl` manifest.

    fps only sets the timestamps: at the default 7 fps an object's views last exactly 1 s,
    the minimum clip length of pipelines/curate-multiview.yaml.
    """
    from data_engine.video import write_video  # here: rendering and measuring need numpy only

    if size % 2:
        raise ValueError(f"size: H.264 in yuv420p needs an even frame side, got {size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with open(out_dir / "specs.jsonl", "w") as manifest:
        for i, spec in enumerate(specs):
            path = out_dir / f"{i:04d}_{spec.shape}_{spec.palette}.mp4"
            write_video(path, list(render_views(spec, size)), fps=fps)
            path.with_suffix(".txt").write_text(spec.caption + "\n")
            record = {
                "spec": dataclasses.asdict(spec),
                "caption": spec.caption,
                "poses": poses(spec),
                "size": size,
                "fps": fps,
                "background": list(BACKGROUND),
            }
            path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
            manifest.write(
                json.dumps({"path": str(path), **dataclasses.asdict(spec), "caption": spec.caption})
                + "\n"
            )
            paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m demos.multiview",
        description="Write multi-view renders (input view + Zero123++'s six views) as 7-frame "
        "MP4s with sidecar captions and poses.",
    )
    parser.add_argument("out_dir", type=Path, help="directory for the training objects")
    parser.add_argument("--objects", type=int, default=40, help="training objects (default 40)")
    parser.add_argument("--size", type=int, default=64, help="frame side in px (default 64)")
    parser.add_argument("--fps", type=int, default=7, help="frame rate (default 7: 1 s per object)")
    parser.add_argument("--seed", type=int, default=0, help="split and pose seed (default 0)")
    parser.add_argument("--held-out", type=int, default=0, help="held-out objects (default 0)")
    parser.add_argument(
        "--held-out-dir",
        type=Path,
        help="where held-out objects go (default OUT_DIR-held-out, outside OUT_DIR so curating "
        "OUT_DIR never sees them)",
    )
    args = parser.parse_args(argv)
    train, held_out = specs_split(args.objects, args.held_out, args.seed)
    written = write_dataset(args.out_dir, train, args.size, args.fps)
    print(f"{len(written)} training objects in {args.out_dir}")
    if held_out:
        held_dir = args.held_out_dir or args.out_dir.with_name(args.out_dir.name + "-held-out")
        written = write_dataset(held_dir, held_out, args.size, args.fps)
        print(f"{len(written)} held-out objects in {held_dir}")


if __name__ == "__main__":
    main()
