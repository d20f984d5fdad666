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
