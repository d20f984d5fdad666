"""Shared fixtures for training tests: a tiny database with real videos, tiny encoders, Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_engine.store import CLIPS, Database
from training.encoders import make_tiny_text_encoder, make_tiny_vae

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def write_video(
    path: Path, colour: tuple[int, int, int], num_frames: int, size: tuple[int, int] = (48, 64)
) -> None:
    """A square moving right on a grey background, H.264 via PyAV (no ffmpeg binary here)."""
    import av

    height, width = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            frame = np.full((height, width, 3), 128, np.uint8)
            x = 2 + i % (width - 14)
            frame[16:28, x : x + 12] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("encoders")
    return {
        "vae": str(make_tiny_vae(root / "vae")),
        "text": str(make_tiny_text_encoder(root / "text")),
    }


@pytest.fixture(scope="session")
def clips_db(tmp_path_factory) -> str:
    """A database whose clips table holds 4 real clips (one too short) and a snapshot `all`."""
    root = tmp_path_factory.mktemp("db")
    videos = root / "videos"
    videos.mkdir()
    rows = []
    for i, (name, colour) in enumerate(COLOURS.items()):
        uri = videos / f"{name}.mp4"
        write_video(uri, colour, num_frames=40)
        rows.append(
            {
                "clip_id": f"clip-{name}",
                "video_id": f"video-{name}",
                "uri": str(uri),
                "start_frame": 4 if i == 0 else 0,
                "end_frame": 36 if i == 0 else 40,
                "fps": 24.0,
                "width": 64,
                "height": 48,
                "duration_s": 40 / 24,
                "caption": f"a {name} square moves right",
            }
        )
    rows.append({**rows[0], "clip_id": "clip-short", "start_frame": 0, "end_frame": 5})
    rows.append({**rows[1], "clip_id": "clip-nocaption", "caption": None})
    broken = videos / "broken.mp4"
    broken.write_bytes(b"not a video" * 100)
    rows.append({**rows[1], "clip_id": "clip-broken", "uri": str(broken)})
    db = Database(root / "db")
    db.write(CLIPS, pa.Table.from_pylist(rows))
    db.create_snapshot("all", None)
    return db.uri


@pytest.fixture(scope="module")
def ray_cluster(ray_session):
    """The session's real 2-CPU local Ray (tests/conftest.py), shared with the data engine's
    tests so the suite starts Ray once."""
    yield ray_session


TRAIN_PREPARE = """
latents_table: latents
frame_stride: 1
buckets:
  - {{num_frames: 8, height: 16, width: 16}}
  - {{num_frames: 8, height: 16, width: 24}}
encoder: {{kind: pixel, pixel_patch: 2, text_path: {text}, text_max_length: 48}}
encoder_num_cpus: 0.5
decode_num_cpus: 0.5
encode_batch_size: 16
"""


@pytest.fixture(scope="session")
def train_db(tmp_path_factory, tiny_encoders) -> str:
    """A database with a prepared pixel latents table: 16 samples in two buckets (8 square
    f8x16x16, 8 wide f8x16x24), for the Ray Train tests."""
    import ray

    from training.prepare import run_prepare

    root = tmp_path_factory.mktemp("traindb")
    rows = []
    for i, (name, colour) in enumerate([*COLOURS.items(), ("white", (255, 255, 255))]):
        size = (48, 48) if i % 2 else (48, 64)
        uri = root / f"{name}.mp4"
        write_video(uri, colour, num_frames=40, size=size)
        for k in range(4):
            rows.append(
                {
                    "clip_id": f"{name}-{k}",
                    "video_id": name,
                    "uri": str(uri),
                    "start_frame": 10 * k,
                    "end_frame": 10 * k + 10,
                    "fps": 24.0,
                    "width": size[1],
                    "height": size[0],
                    "duration_s": 10 / 24,
                    "caption": f"a {name} square moves right",
                }
            )
    db = Database(root / "db")
    db.write(CLIPS, pa.Table.from_pylist(rows))
    db.create_snapshot("train", None)
    config = root / "prepare.yaml"
    config.write_text(TRAIN_PREPARE.format(text=tiny_encoders["text"]))
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_prepare(db.uri, "train", str(config))
    finally:
        if started:
            ray.shutdown()
    assert summary["buckets"] == {"f8x16x16": 8, "f8x16x24": 8}, summary
    return db.uri


def write_fake_run(run_dir: Path, meta: dict, preset: str = "stiv-tiny", step: int = 1) -> Path:
    """A run directory in the layout training writes (EMA weights, model config, train state,
    encoders from a latents meta row), with a seeded untrained model: enough for generation,
    export and resume checks without a Ray Train run."""
    import torch

    from model.config import get_preset
    from model.network import STIV
    from tests.helpers.runs import write_checkpoint

    torch.manual_seed(0)
    model = STIV(
        get_preset(preset, in_channels=int(meta["latent_channels"]), text_dim=int(meta["text_dim"]),
                   max_text_tokens=int(meta["text_len"]))
    )  # fmt: skip
    write_checkpoint(run_dir, model, step, meta)
    return run_dir


@pytest.fixture(scope="session")
def relative_run(tmp_path_factory) -> dict[str, Path]:
    """A database and a run prepared from a config whose encoder path is *relative* to the
    working directory it was run from (`root`): the clips table has one clip without a
    caption, so prepare writes only its meta row and needs no Ray. Also a database whose
    snapshot has no caption and no DSG columns at all (for the CLI error checks)."""
    import os

    from training.latents import meta_table_name
    from training.prepare import run_prepare

    root = tmp_path_factory.mktemp("relative")
    make_tiny_text_encoder(root / "models" / "text")
    row = {"clip_id": "c0", "video_id": "v0", "uri": str(root / "none.mp4"), "start_frame": 0,
           "end_frame": 40, "fps": 24.0, "width": 64, "height": 48, "duration_s": 40 / 24}  # fmt: skip
    plain = Database(root / "plain-db")
    plain.write(CLIPS, pa.Table.from_pylist([row]))
    plain.create_snapshot("all", None)
    db = Database(root / "db")
    db.write(CLIPS, pa.Table.from_pylist([{**row, "caption": None}]))
    db.create_snapshot("all", None)
    (root / "prepare.yaml").write_text(
        "latents_table: latents\nframe_stride: 1\nbuckets: [{num_frames: 8, height: 16, width: 16}]\n"
        "encoder: {kind: pixel, pixel_patch: 2, text_path: models/text, text_max_length: 16}\n"
    )
    cwd = os.getcwd()
    os.chdir(root)
    try:
        run_prepare("db", "all", "prepare.yaml")
    finally:
        os.chdir(cwd)
    meta = db.table(meta_table_name("latents")).to_table().to_pylist()[0]
    run = write_fake_run(root / "run", meta)
    return {"root": root, "db": Path(db.uri), "plain_db": Path(plain.uri), "run": run}


@pytest.fixture(scope="session")
def apps_generator(tmp_path_factory):
    """A random tiny STIV over 2x2 pixel latents (12 channels) and the tiny CLIP stand-in;
    its training tasks as an all-tasks run would record them."""
    import torch

    from model.config import get_preset
    from model.network import STIV
    from training.encoders import TextEncoder
    from training.generate import Generator

    text_dir = make_tiny_text_encoder(tmp_path_factory.mktemp("text"), max_length=16)
    text = TextEncoder(str(text_dir), "text", 16)
    empty = text.encode([""])
    torch.manual_seed(0)
    model = STIV(get_preset("stiv-tiny", in_channels=12, text_dim=text.dim, max_text_tokens=16))
    info = {"text_path": str(text_dir), "text_len": 16, "encoder_kind": "pixel",
            "pixel_patch": 2, "frame_stride": 1}  # fmt: skip
    null = (empty.tokens[0], empty.mask[0], empty.pooled[0])
    generator = Generator.from_parts(model.eval(), model.cfg, info, null)
    generator.tasks = [
        {"name": "t2v", "given_frames": "none", "frame_stride": 4},
        {"name": "predict", "given_frames": "first_k", "frame_stride": 5},
        {"name": "upsample", "given_frames": "every_other", "frame_stride": 2},
        {"name": "keyframe", "given_frames": "first", "frame_stride": 7},
        {"name": "fill", "given_frames": "endpoints", "frame_stride": 1},
        {"name": "multiview", "given_frames": "views", "frame_stride": 1},
    ]
    return generator


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, ray_session) -> tuple[Path, dict]:
    """The train-demo with a few steps per stage (the full one is `make train-demo`), run once:
    generation's tests read it, and the apps-demo test starts from a copy of its TI2V run."""
    from demos.train_demo import main as train_demo

    root = tmp_path_factory.mktemp("train_demo")
    result = train_demo(
        ["--root", str(root), "--steps-scale", "0.001", "--videos-per-combo", "1",
         "--seeds-per-prompt", "1", "--sampling-steps", "2", "--batch-size", "4",
         "--figures", str(root / "figures")]
    )  # fmt: skip
    return root, result
