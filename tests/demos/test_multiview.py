"""Multi-view renders (demos/multiview.py): the Zero123++ camera layout, distinct faces, exact
silhouettes, held-out objects, and the data engine's path (pipelines/curate-multiview.yaml)
with real Ray and real Lance."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import av
import numpy as np
import pytest

from data_engine.config import load_curate_config
from data_engine.pipeline import run_curate
from data_engine.split import SplitConfig, detect_scenes
from data_engine.store import Database
from data_engine.video import probe
from demos import multiview as mv

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "pipelines" / "curate-multiview.yaml"
SIZE = 64


def _decode(path: Path) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB frames of an MP4."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _object_colours(frame: np.ndarray) -> set[tuple[int, ...]]:
    """The distinct RGB colours of a rendered frame's object pixels."""
    pixels = frame[mv.silhouette(frame)]
    return {tuple(int(c) for c in colour) for colour in np.unique(pixels, axis=0)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[mv.ObjectSpec], list[Path]]:
    """Three objects of three shapes, written as the CLI writes them."""
    specs = [
        mv.ObjectSpec("cube", "red-blue", 1, 12.0, 18.0),
        mv.ObjectSpec("pyramid", "green-yellow", 2, 140.0, 5.0),
        mv.ObjectSpec("octahedron", "blue-yellow", 3, 275.5, 27.0),
    ]
    out_dir = tmp_path_factory.mktemp("multiview") / "videos"
    return specs, mv.write_dataset(out_dir, specs, SIZE, fps=7)


def test_a_render_is_the_input_view_then_six_views_at_the_documented_poses() -> None:
    """The multi-view model reads frame 0 as the input and frames 1..6 as Zero123++ v1.2's
    views (docs/multiview.md, "Camera layout"): a wrong count or pose trains the wrong task."""
    assert mv.VIEW_POSES == (
        (30.0, 20.0),
        (90.0, -10.0),
        (150.0, 20.0),
        (210.0, -10.0),
        (270.0, 20.0),
        (330.0, -10.0),
    )
    spec = mv.ObjectSpec("prism", "red-green", 0, input_azimuth=300.0, input_elevation=12.5)
    frames = mv.render_views(spec, SIZE)
    assert frames.shape == (mv.NUM_FRAMES, SIZE, SIZE, 3) == (7, SIZE, SIZE, 3)
    assert frames.dtype == np.uint8
    poses = mv.poses(spec)
    assert len(poses) == 7
    assert poses[0] == {"azimuth": 300.0, "elevation": 12.5, "distance": 4.5, "fov": 30.0}
    for pose, (offset, elevation) in zip(poses[1:], mv.VIEW_POSES, strict=True):
        assert pose["azimuth"] == (300.0 + offset) % 360.0  # 330, 30, 90, 150, 210, 270
        assert 0.0 <= pose["azimuth"] < 360.0
        assert pose["elevation"] == elevation  # absolute, whatever the input's elevation
        assert pose["distance"] == mv.CAMERA_DISTANCE and pose["fov"] == mv.FOV_DEG
    assert [p["azimuth"] for p in poses[1:]] == [330.0, 30.0, 90.0, 150.0, 210.0, 270.0]
    # Frame 0 is the input pose itself, frames 1..6 the poses in VIEW_POSES order.
    for frame, pose in zip(frames, poses, strict=True):
        expected = mv.render_view(
            spec.shape, spec.palette, pose["azimuth"], pose["elevation"], SIZE
        )
        np.testing.assert_array_equal(frame, expected)


@pytest.mark.parametrize("shape", mv.SHAPES)
def test_views_differ_and_every_silhouette_lies_inside_the_frame(shape: str) -> None:
    """Seven identical frames would teach nothing about 3D; an object cut by the frame edge
    would make its silhouette IoU meaningless."""
    frames = mv.render_views(mv.ObjectSpec(shape, "red-yellow", 0, 33.0, 10.0), SIZE)
    for i, j in itertools.combinations(range(7), 2):
        assert not np.array_equal(frames[i], frames[j]), f"views {i} and {j} are the same"
    masks = mv.silhouette(frames)
    areas = masks.sum(axis=(1, 2))
    assert (areas > 0.1 * SIZE * SIZE).all(), areas  # the object fills a good part of each view
    border = masks[:, [0, -1], :].any() or masks[:, :, [0, -1]].any()
    assert not border, "the object touches the frame edge"
    # The background is exactly BACKGROUND wherever the silhouette is not.
    assert (frames[~masks] == np.array(mv.BACKGROUND, np.uint8)).all()


def test_every_face_has_its_own_colour_and_opposite_cube_views_share_none() -> None:
    """Distinct faces are what makes the views of one object tell apart: the views at +30 deg
    (from above) and +210 deg (from below) of a cube see opposite faces, so no colour."""
    for shape, palette in itertools.product(mv.SHAPES, mv.PALETTES):
        colours = mv.face_colours(shape, palette)
        assert len({tuple(c) for c in colours}) == len(colours), (shape, palette)
    frames = mv.render_views(mv.ObjectSpec("cube", "green-blue", 0, 20.0, 15.0), SIZE)
    above, below = _object_colours(frames[1]), _object_colours(frames[4])
    assert len(above) == 3 and len(below) == 3  # a cube seen off-axis shows three faces
    assert not above & below


def test_the_silhouette_threshold_holds_for_every_face_colour_and_noisy_frames() -> None:
    """Generated frames are noisy: the documented threshold must sit well inside the gap
    between the background and the nearest face colour, lit or unlit."""
    background = np.array(mv.BACKGROUND, float)
    nearest = min(
        np.linalg.norm(np.clip(mv.face_colours(s, p) * shade, 0, 255) - background, axis=1).min()
        for s, p in itertools.product(mv.SHAPES, mv.PALETTES)
        for shade in (mv.AMBIENT, mv.AMBIENT + mv.DIFFUSE)
    )
    assert nearest > 2 * mv.SILHOUETTE_THRESHOLD, nearest
    frames = mv.render_views(mv.ObjectSpec("prism", "blue-yellow", 0, 70.0, 20.0), SIZE)
    noise = np.random.default_rng(0).normal(0.0, 20.0, frames.shape)
    noisy = np.clip(frames + noise, 0, 255).astype(np.uint8)
    assert (mv.silhouette_iou(frames, noisy) > 0.97).all()


def test_a_full_turn_renders_the_same_view() -> None:
    """Azimuth wraps: a+360 is the same camera (poses are stored mod 360)."""
    for azimuth in (0.0, 47.0, 123.4, 359.9):
        for elevation in (-10.0, 20.0):
            first = mv.render_view("pyramid", "red-blue", azimuth, elevation, SIZE)
            turned = mv.render_view("pyramid", "red-blue", azimuth + 360.0, elevation, SIZE)
            np.testing.assert_array_equal(first, turned)


def test_silhouette_iou_is_one_with_itself_and_below_one_with_another_object() -> None:
    """The multi-view figure compares generated views with true ones by IoU; it must score a
    perfect match 1 and a different object less."""
    cube = mv.render_views(mv.ObjectSpec("cube", "red-blue", 0, 10.0, 10.0), SIZE)
    prism = mv.render_views(mv.ObjectSpec("prism", "red-blue", 0, 10.0, 10.0), SIZE)
    np.testing.assert_array_equal(mv.silhouette_iou(cube, cube), np.ones(7))
    iou = mv.silhouette_iou(cube, prism)
    assert iou.shape == (7,) and (iou < 1.0).all() and (iou > 0.0).all()
    # Copying the input view into all six slots (the baseline) is not a perfect score.
    copied = np.repeat(cube[:1], 7, axis=0)
    assert (mv.silhouette_iou(cube, copied)[1:] < 1.0).all()
    blank = np.full_like(cube, mv.BACKGROUND)
    np.testing.assert_array_equal(mv.silhouette_iou(blank, blank), np.ones(7))
    np.testing.assert_array_equal(mv.silhouette_iou(cube, blank), np.zeros(7))


def test_held_out_objects_are_combinations_never_trained_on() -> None:
    """Held-out objects measure generalisation to new (shape, palette) combinations; one
    leaked combination would measure memory instead. Every shape and hue is still trained."""
    for seed in range(5):
        train, held_out = mv.specs_split(60, 12, seed)
        assert len(train) == 60 and len(held_out) == 12
        train_combos = {(s.shape, s.palette) for s in train}
        held_combos = {(s.shape, s.palette) for s in held_out}
        assert not train_combos & held_combos
        assert len(train_combos | held_combos) == len(mv.SHAPES) * len(mv.PALETTES)
        assert {s.shape for s in train} == set(mv.SHAPES)
        assert {h for s in train for h in s.hues} == set(mv.COLOURS)
        assert not {s.seed for s in train} & {s.seed for s in held_out}
        for spec in train + held_out:
            low, high = mv.INPUT_ELEVATION_RANGE
            assert 0.0 <= spec.input_azimuth <= 360.0 and low <= spec.input_elevation <= high
    assert mv.specs_split(8, 4, 3) == mv.specs_split(8, 4, 3)  # deterministic


def test_captions_use_only_the_fixed_vocabulary_and_specs_are_validated() -> None:
    """The tiny text encoder has one token per word in MULTIVIEW_CAPTION_WORDS."""
    assert mv.ObjectSpec("cube", "red-blue", 0, 0.0, 0.0).caption == "a red and blue cube"
    words = set(mv.MULTIVIEW_CAPTION_WORDS)
    for shape, palette in itertools.product(mv.SHAPES, mv.PALETTES):
        assert set(mv.ObjectSpec(shape, palette, 0, 0.0, 0.0).caption.split()) <= words
    with pytest.raises(ValueError, match="shape"):
        mv.ObjectSpec("sphere", "red-blue", 0, 0.0, 0.0)
    with pytest.raises(ValueError, match="palette"):
        mv.ObjectSpec("cube", "red-pink", 0, 0.0, 0.0)
    with pytest.raises(ValueError, match="input_elevation"):
        mv.ObjectSpec("cube", "red-blue", 0, 0.0, 90.0)


def test_written_objects_carry_caption_poses_and_keep_their_silhouettes(
    dataset: tuple[list[mv.ObjectSpec], list[Path]],
) -> None:
    """Each MP4 has the 7 views and its sidecars; H.264 must not move the silhouettes the
    IoU figure is measured on."""
    specs, paths = dataset
    manifest = [json.loads(line) for line in (paths[0].parent / "specs.jsonl").open()]
    assert [row["path"] for row in manifest] == [str(p) for p in paths]
    for spec, path, row in zip(specs, paths, manifest, strict=True):
        assert path.with_suffix(".txt").read_text() == spec.caption + "\n"
        record = json.loads(path.with_suffix(".json").read_text())
        assert mv.ObjectSpec(**record["spec"]) == spec
        assert row == {"path": str(path), **record["spec"], "caption": spec.caption}
        assert record["poses"] == mv.poses(spec) and record["caption"] == spec.caption
        decoded = _decode(path)
        assert decoded.shape == (7, SIZE, SIZE, 3)
        assert (mv.silhouette_iou(mv.render_views(spec, SIZE), decoded) > 0.95).all()


def test_the_cli_writes_training_and_held_out_objects_apart(tmp_path: Path) -> None:
    """`python -m demos.multiview OUT --held-out M` must keep held-out objects outside OUT, or
    curating OUT would train on them."""
    mv.main([str(tmp_path / "train"), "--objects", "3", "--held-out", "2", "--size", "32"])
    train = sorted((tmp_path / "train").glob("*.mp4"))
    held_out = sorted((tmp_path / "train-held-out").glob("*.mp4"))
    assert len(train) == 3 and len(held_out) == 2
    assert _decode(held_out[0]).shape == (7, 32, 32, 3)
    train_specs, held_specs = mv.specs_split(3, 2, 0)
    assert [p.with_suffix(".txt").read_text().strip() for p in held_out] == [
        s.caption for s in held_specs
    ]
    with pytest.raises(ValueError, match="even"):
        mv.write_dataset(tmp_path / "odd", train_specs[:1], size=33)


def test_the_config_keeps_each_object_whole_where_a_content_detector_would_cut(
    dataset: tuple[list[mv.ObjectSpec], list[Path]],
) -> None:
    """Seven views are seven "shots": PySceneDetect's ContentDetector at its default threshold
    cuts them apart; the multi-view config's detection never cuts, and its clip limits keep
    exactly the 7 frames (no Ray: the split stage's own function)."""
    _, paths = dataset
    split = load_curate_config(CONFIG).split
    cutting = SplitConfig(detector="content", min_scene_len_frames=1, min_clip_s=0, trim_frames=0)
    clips_cut = [detect_scenes(str(p), probe(str(p)), cutting) for p in paths]
    assert any(len(clips) > 1 for clips in clips_cut), clips_cut
    for path in paths:
        for min_scene_len in (split.min_scene_len_frames, 1):
            cfg = SplitConfig(**{**split.__dict__, "min_scene_len_frames": min_scene_len})
            assert detect_scenes(str(path), probe(str(path)), cfg) == [(0, 7)]


def test_curating_the_views_gives_one_seven_frame_clip_per_object_with_its_caption(
    ray_session, dataset: tuple[list[mv.ObjectSpec], list[Path]], tmp_path: Path
) -> None:
    """The data engine's own path (probe, split, motion, clarity, sidecar captions) turns each
    object into exactly one training clip of its 7 views, as `stiv curate --config
    pipelines/curate-multiview.yaml` does."""
    specs, paths = dataset
    cfg = load_curate_config(CONFIG)
    summary = run_curate([str(paths[0].parent)], str(tmp_path / "db"), cfg, show_progress=False)
    assert summary.videos_done == 3 and summary.videos_quarantined == 0
    assert summary.clips == 3 and summary.clip_errors == 0
    db = Database(tmp_path / "db")
    rows = db.table("clips").to_table().to_pylist()
    captions = {str(p): s.caption for s, p in zip(specs, paths, strict=True)}
    assert sorted(r["uri"] for r in rows) == sorted(captions)
    for row in rows:
        assert (row["start_frame"], row["end_frame"]) == (0, 7)
        assert row["caption"] == captions[row["uri"]]
        assert row["caption_backend"] == "sidecar"
        assert row["motion_score"] is not None and row["clarity_score"] is not None
    videos = db.table("videos").to_table(columns=["uri", "num_frames"]).to_pylist()
    assert sorted(v["num_frames"] for v in videos) == [7, 7, 7]
