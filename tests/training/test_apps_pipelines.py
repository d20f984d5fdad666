"""Every application stage config (pipelines/train-{v2v,tup,keyframe,multiview,all-tasks}-tiny-
cpu.yaml) loads and runs through Ray Train as written (two steps), on one stride-1 latents
table holding 56-frame shape clips and 7-frame multi-view renders, as the apps-demo prepares
it."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from data_engine.store import CLIPS, Database
from data_engine.video import clip_id_for, probe, video_id_for
from demos import multiview
from demos.apps_demo import BUCKETS, SOURCE_FRAMES, STAGES, TRAVEL
from stiv.cli import main
from training.checkpoint import list_checkpoints
from training.shapes import all_specs, write_dataset

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


@pytest.fixture(scope="module")
def apps_table(tmp_path_factory, ray_cluster) -> Path:
    """A working directory with `models/`, and `runs/demo/db` holding the clips (8 shape
    videos, 4 renders) and their stride-1 latents table `latents_tiny_apps`."""
    root = tmp_path_factory.mktemp("apps")
    paths = write_dataset(root / "videos", specs := all_specs(8, seed=5), SOURCE_FRAMES, 32, 8,
                          travel=TRAVEL)  # fmt: skip
    captions = [s.caption for s in specs]
    objects, _ = multiview.specs_split(4, 0, seed=0)
    paths += multiview.write_dataset(root / "views", objects, size=32, fps=7)
    captions += [o.caption for o in objects]
    rows = []
    for path, caption in zip(paths, captions):
        info, video_id = probe(str(path)), video_id_for(str(path))
        rows.append({"clip_id": clip_id_for(video_id, 0, info.num_frames), "video_id": video_id,
                     "uri": str(path), "start_frame": 0, "end_frame": info.num_frames,
                     "fps": info.fps, "width": info.width, "height": info.height,
                     "duration_s": info.duration_s, "caption": caption})  # fmt: skip
    db = Database(root / "runs/demo/db")
    db.write(CLIPS, pa.Table.from_pylist(rows))
    db.create_snapshot("apps", None)
    assert main(["tiny-models", "--out", str(root / "models")]) == 0
    code = main(["prepare", "--db", str(root / "runs/demo/db"), "--snapshot", "apps", "--config",
                 str(PIPELINES / "prepare-tiny-cpu.yaml"), "--set",
                 f"encoder.text_path={root / 'models/tiny-clip-text'}", "--set",
                 "latents_table=latents_tiny_apps", "--set", "frame_stride=1", "--set",
                 f"buckets={BUCKETS}"])  # fmt: skip
    assert code == 0
    return root


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_application_stage_runs_two_steps(stage, apps_table, monkeypatch, capsys) -> None:
    """The stage's tasks cut their windows from the table (keyframes at stride 7 need all 50
    frames of the 56-frame clips' centred window), draw per sample and train; from scratch here
    (the demo starts them from the TI2V run)."""
    monkeypatch.chdir(apps_table)
    code = main(["train", "--config", str(PIPELINES / f"train-{stage}-tiny-cpu.yaml"),
                 "--set", "max_steps=2", "--set", "data.batch_size=2", "--set", "log_every=1",
                 "--set", "init_from.mode=none", "--set", "init_from.run_dir="])  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["steps"] == 2, summary
    assert [s for s, _ in list_checkpoints(apps_table / "runs/demo" / stage)] == [2]
    metrics = (apps_table / "runs/demo" / stage / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2 and all(json.loads(m)["loss"] > 0 for m in metrics)
