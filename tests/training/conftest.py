"""Shared fixtures for training tests: a tiny database with real videos, tiny encoders, Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_engine.store import CLIPS, Database
from training.encoders import make_tiny_text_encoder, make_tiny_vae

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def write_video(path: Path, colour: tuple[int, int, int], num_frames: int, size=(48, 64)) -> None:
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
    db = Database(root / "db")
    db.write(CLIPS, pa.Table.from_pylist(rows))
    db.create_snapshot("all", None)
    return db.uri


@pytest.fixture(scope="module")
def ray_cluster():
    """A real 2-CPU local Ray, shut down after the module (no stray processes)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
