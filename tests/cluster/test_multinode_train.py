"""`stiv train` on a real 2-node Ray cluster (head + worker from `ray start`, see
test_multinode.py): latents prepared through the cluster's Ray Data from a driver given
`--address`, then a tiny STIV run with DeepSpeed ZeRO-2 and one rank per node (STRICT_SPREAD),
submitted as a Ray job, that loses its worker node mid-run. The plain two-node run (per-rank
optimizer shards, every step logged) is test_job_submit.py's, through `ray job submit`."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
from test_multinode import REPO, LocalCluster

from data_engine.store import CLIPS, Database
from data_engine.video import clip_id_for, probe, video_id_for
from training.encoders import make_tiny_text_encoder
from training.shapes import all_specs, write_dataset


@pytest.fixture(scope="module")
def cluster():
    with tempfile.TemporaryDirectory(prefix="stiv-train-cluster-", dir="/tmp") as tmp:
        local = LocalCluster(Path(tmp))
        try:
            local.start_head()
            local.add_worker()
            local.wait_for_nodes(2)
            yield local
        finally:
            local.shutdown()


def _database(root: Path) -> Path:
    """A clips table of captioned moving-shape videos and a snapshot over it."""
    specs = all_specs(8, seed=5)
    paths = write_dataset(root / "videos", specs, num_frames=16, size=32, fps=8)
    rows = []
    for spec, path in zip(specs, paths):
        info = probe(str(path))
        rows.append(
            {
                "clip_id": clip_id_for(video_id_for(str(path)), 0, info.num_frames),
                "video_id": video_id_for(str(path)),
                "uri": str(path),
                "start_frame": 0,
                "end_frame": info.num_frames,
                "fps": info.fps,
                "width": info.width,
                "height": info.height,
                "duration_s": info.duration_s,
                "caption": spec.caption,
            }
        )
    db = Database(root / "db")
    db.write(CLIPS, pa.Table.from_pylist(rows))
    db.create_snapshot("shapes", None)
    return root / "db"


def _prepare_on_cluster(cluster: LocalCluster, tmp_path: Path) -> tuple[Path, dict]:
    """`stiv prepare` through the cluster's Ray Data: the database and prepare's summary."""
    db = _database(tmp_path)
    text = make_tiny_text_encoder(tmp_path / "text", max_length=40)
    prepare = subprocess.run(
        [sys.executable, "-m", "stiv.cli", "prepare", "--db", str(db), "--snapshot", "shapes",
         "--config", "pipelines/prepare-tiny-cpu.yaml", "--set", f"encoder.text_path={text}",
         "--set", "encoder.text_max_length=40", "--address", cluster.address],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert prepare.returncode == 0, prepare.stderr[-3000:]
    return db, json.loads(prepare.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_training_survives_losing_a_node(cluster: LocalCluster, tmp_path: Path) -> None:
    """A worker node dies mid-run (all its processes at once); a replacement node joins and
    Ray Train's FailureConfig restarts the ranks from the latest checkpoint: the job finishes
    every step, and each step is logged once."""
    import time

    db, prepared = _prepare_on_cluster(cluster, tmp_path)
    assert prepared["written"] == 8
    run_dir = tmp_path / "runs" / "t2v"
    sets = [
        f"db={db}", f"run_dir={run_dir}", "max_steps=40", "checkpoint_every=5", "log_every=1",
        "init_from.mode=none", "init_from.run_dir=", "data.batch_size=2",
        "scaling.num_workers=2", "scaling.placement_strategy=STRICT_SPREAD",
        "scaling.zero_stage=2", "scaling.data_cpus=1.0", "scaling.cpus_per_worker=0", "scaling.max_failures=3",
    ]  # fmt: skip
    submitter = cluster.submit(
        "stiv train --config pipelines/train-t2v-tiny-cpu.yaml "
        + " ".join(f"--set {s}" for s in sets)
    )
    metrics_file = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 12:
            break
        time.sleep(0.2)
    logged_at_kill = len(metrics_file.read_text().splitlines())
    worker = cluster.nodes[-1]
    cluster.kill(worker)
    cluster.add_worker()  # the replacement machine
    out, err = submitter.communicate(timeout=600)
    assert submitter.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["status"] == "SUCCEEDED", (result["message"], result["logs"][-4000:])
    steps = [json.loads(line)["step"] for line in metrics_file.read_text().splitlines()]
    assert steps == list(range(1, 41)), steps
    assert 12 <= logged_at_kill < 40, "the node must die mid-run"
    assert "restart" in result["logs"].lower() or "fail" in result["logs"].lower(), result["logs"][
        -3000:
    ]
