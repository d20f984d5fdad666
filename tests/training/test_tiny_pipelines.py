"""Every tiny YAML in pipelines/ runs as written on a fresh clone after one command
(`stiv tiny-models --out models/`), from curated clips to two training steps per stage."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from data_engine.store import CLIPS, Database
from data_engine.video import clip_id_for, probe, video_id_for
from stiv.cli import main
from training.checkpoint import list_checkpoints
from training.shapes import all_specs, write_dataset

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
STAGE_ORDER = ("t2i", "t2v", "ti2v")  # each tiny stage initialises from the one before


def _curated_clips(db_path: Path, videos: Path) -> None:
    """What `stiv curate` leaves for the tiny pipelines: captioned moving-shape clips and the
    snapshot `demo` they name."""
    rows = []
    for spec, path in zip(specs := all_specs(8, seed=3), write_dataset(videos, specs, 16, 32, 8)):
        info, video_id = probe(str(path)), video_id_for(str(path))
        rows.append({"clip_id": clip_id_for(video_id, 0, info.num_frames), "video_id": video_id,
                     "uri": str(path), "start_frame": 0, "end_frame": info.num_frames,
                     "fps": info.fps, "width": info.width, "height": info.height,
                     "duration_s": info.duration_s, "caption": spec.caption})  # fmt: skip
    db = Database(db_path)
    db.write(CLIPS, pa.Table.from_pylist(rows))
    db.create_snapshot("demo", None)


@pytest.mark.slow
def test_every_tiny_yaml_runs_after_tiny_models(tmp_path, monkeypatch, ray_cluster, capsys):
    """`pipelines/prepare-tiny-cpu*.yaml` name `models/tiny-clip-text`, which only the
    train-demo used to write ("not a model directory" for a new user). After `stiv
    tiny-models --out models`, each tiny prepare YAML runs with its own relative paths from the
    working directory, and so does the first training stage, for real. The later stages are
    checked with `--dry-run` against the latents and the run before them (each starting Ray
    Train costs ~25 s; the train-demo fixture trains all three from these YAMLs).

    The first stage also runs under a spent `max_minutes`: it stops at step 1 and checkpoints
    that step (how the CPU train-demo keeps to its time limit)."""
    monkeypatch.chdir(tmp_path)
    _curated_clips(tmp_path / "runs/demo/db", tmp_path / "videos")
    assert main(["tiny-models", "--out", "models"]) == 0
    assert (tmp_path / "models/tiny-clip-text/config.json").is_file()

    prepares = sorted(PIPELINES.glob("prepare-tiny*.yaml"))
    # The application stages need stride-1 long clips: test_apps_demo.py runs each two steps.
    trains = [PIPELINES / f"train-{stage}-tiny-cpu.yaml" for stage in STAGE_ORDER]
    assert len(prepares) == 2 and all(p.is_file() for p in trains)
    for config in prepares:
        code = main(
            ["prepare", "--db", "runs/demo/db", "--snapshot", "demo", "--config", str(config)]
        )
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert code == 0 and summary["written"] == 8, (config.name, summary)

    code = main(["train", "--config", str(trains[0]), "--set", "max_steps=2",
                 "--set", "data.batch_size=2", "--set", "log_every=1",
                 "--set", "max_minutes=1e-6"])  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["steps"] == 1, summary
    assert [s for s, _ in list_checkpoints(tmp_path / "runs/demo" / STAGE_ORDER[0])] == [1]

    parent_run_dir = summary["run_dir"]
    for index, config in enumerate(trains[1:]):
        assert main(["train", "--config", str(config), "--dry-run"]) == 0
        plan = json.loads(capsys.readouterr().out)
        resolved = plan["config"]
        assert resolved["init_from"]["run_dir"] == parent_run_dir, (config.name, resolved)
        assert plan["buckets"] and all(b["samples"] for b in plan["buckets"].values())
        # The trained first stage is found and read (its RoPE base); the second is not trained
        # here, and the dry run says so.
        missing = [n for n in plan["notes"] if f"{parent_run_dir} not found" in n]
        assert len(missing) == index, (config.name, plan["notes"])
        parent_run_dir = resolved["run_dir"]
