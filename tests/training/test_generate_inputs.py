"""`stiv generate`'s inputs: a run sampled from another working directory, and `--video` read
the way prepare reads training clips (rotation metadata, object storage)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from data_engine.store import Database
from demos.samples import write_rotated_video
from training.generate import read_video_frames

STIV = [sys.executable, "-m", "stiv.cli"]


def test_encoder_paths_are_stored_absolute_and_generate_runs_elsewhere(relative_run, tmp_path):
    """Prepare ran from `root` with `encoder.text_path: models/text`; the meta row (and so the
    run's encoders.json) must hold the absolute path, so `stiv generate` works from any
    directory, as a user sampling a colleague's run does."""
    meta = Database(relative_run["db"]).table("latents_meta").to_table().to_pylist()[0]
    assert meta["text_path"] == str(relative_run["root"] / "models" / "text")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run(
        [*STIV, "generate", "--checkpoint", str(relative_run["run"]), "--prompt", "a red square",
         "--frames", "4", "--height", "16", "--width", "16", "--steps", "2", "--out", "x.mp4"],
        cwd=elsewhere, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["mode"] == "t2v"
    assert (elsewhere / "x.mp4").stat().st_size > 0 and (elsewhere / "x.png").is_file()


def test_video_condition_honours_rotation(tmp_path):
    """A clip stored landscape with a 90-degree display rotation is seen portrait: its red
    top-left marker must end up top-right, as prepare shows such clips to training."""
    path = write_rotated_video(tmp_path / "rotated.mp4", rotation=90, num_frames=8)
    frames = read_video_frames(str(path), count=2, stride=2, height=64, width=48)
    assert frames.shape == (2, 64, 48, 3)
    corner = frames[0, :8, -8:].reshape(-1, 3).mean(axis=0)
    assert corner[0] > 180 and corner[1] < 80 and corner[2] < 80, corner
    assert np.abs(frames[0, :8, :8].astype(int) - (255, 0, 0)).mean() > 60
