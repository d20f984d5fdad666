"""`ray job submit` end to end, exactly as docs/cluster.md and the README's cluster section
type it: a local 2-node cluster (`ray start` head with the dashboard's job server, plus a
worker node), then `ray job submit --address http://127.0.0.1:PORT --working-dir . -- stiv
curate ...`, `-- stiv prepare ...` and `-- stiv train ...`. The logs stream back to the
submitting terminal, and the rows, latents and checkpoints appear in the shared database and
run directory."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from test_multinode import REPO, LocalCluster, _free_port

from data_engine.store import Database
from training.checkpoint import latest_checkpoint, list_checkpoints
from training.encoders import make_tiny_text_encoder
from training.shapes import all_specs, write_dataset

RAY = str(Path(sys.executable).parent / "ray")


class DashboardCluster(LocalCluster):
    """LocalCluster whose head also runs the dashboard (ray[default]) with its job server."""

    def start_head(self) -> subprocess.Popen:
        self.dashboard_port = _free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        return self._start(
            ["--head", "--port", str(self.port), "--node-ip-address", "127.0.0.1",
             "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(self.dashboard_port), "--temp-dir", str(self.temp_dir)],
            "head",
        )  # fmt: skip

    def wait_for_job_server(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, (self.temp_dir / "head.log").read_text()[-3000:]
            time.sleep(1.0)

    def job_submit(self, *entrypoint: str, timeout_s: float = 420) -> str:
        """`ray job submit` as a user types it; returns everything it printed (the job's logs
        are streamed back until the job ends)."""
        out = subprocess.run(
            [RAY, "job", "submit", "--address", self.dashboard, "--working-dir", ".", "--",
             *entrypoint],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip
        if out.returncode != 0 or "succeeded" not in out.stdout.lower():
            pytest.fail(
                f"{' '.join(entrypoint[:2])}: rc {out.returncode}\n{out.stdout[-5000:]}\n"
                f"{out.stderr[-3000:]}"
            )
        return out.stdout


@pytest.fixture(scope="module")
def cluster():
    with tempfile.TemporaryDirectory(prefix="stiv-job-submit-", dir="/tmp") as tmp:
        local = DashboardCluster(Path(tmp))
        try:
            local.start_head()
            local.add_worker()
            local.wait_for_nodes(2)
            local.wait_for_job_server()
            yield local
        finally:
            local.shutdown()


def _last_json(stdout: str, first_key: str) -> dict:
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip().startswith(f'{{"{first_key}"')]
    assert lines, stdout[-4000:]
    return json.loads(lines[-1])


@pytest.mark.slow
def test_ray_job_submit_curate_then_train(cluster: DashboardCluster, tmp_path: Path) -> None:
    """Curation, latents and a 2-rank ZeRO-2 stage (one rank per node), each submitted with
    `ray job submit`: each job succeeds, its summary line arrives in the submitter's output,
    and clips, latents, metrics for every step and a checkpoint with one optimizer shard per
    rank are where the commands said."""
    videos, db = tmp_path / "videos", tmp_path / "db"
    write_dataset(videos, all_specs(8, seed=5), num_frames=16, size=32, fps=8)
    curated = cluster.job_submit(
        "stiv", "curate", str(videos), "--db", str(db), "--stages", "probe,split,motion,caption",
        "--set", "caption.backend=sidecar", "--set", "split.min_clip_s=1.0",
        "--set", "sampling.frames_per_clip=3", "--format", "json",
    )  # fmt: skip
    summary = _last_json(curated, "videos_done")
    clips = Database(db).table("clips").to_table(columns=["caption"])
    assert summary["videos_done"] == 8 and clips.num_rows >= 8
    assert all(clips["caption"].to_pylist())
    Database(db).create_snapshot("shapes", None)

    text = make_tiny_text_encoder(tmp_path / "text", max_length=16)
    prepared = cluster.job_submit(
        "stiv", "prepare", "--db", str(db), "--snapshot", "shapes",
        "--config", "pipelines/prepare-tiny-cpu.yaml", "--set", f"encoder.text_path={text}",
    )  # fmt: skip
    assert _last_json(prepared, "latents_table")["written"] == clips.num_rows

    run_dir = tmp_path / "runs" / "t2v"
    sets = [
        f"db={db}", f"run_dir={run_dir}", "max_steps=2", "checkpoint_every=2", "log_every=1",
        "init_from.mode=none", "init_from.run_dir=", "data.batch_size=2",
        "scaling.num_workers=2", "scaling.placement_strategy=STRICT_SPREAD",
        "scaling.zero_stage=2", "scaling.data_cpus=1.0", "scaling.cpus_per_worker=0",
    ]  # fmt: skip
    trained = cluster.job_submit(
        "stiv", "train", "--config", "pipelines/train-t2v-tiny-cpu.yaml", "--resume",
        *[arg for s in sets for arg in ("--set", s)],
    )  # fmt: skip
    result = _last_json(trained, "run_dir")
    assert result["steps"] == 2 and result["num_workers"] == 2
    assert [s for s, _ in list_checkpoints(run_dir)] == [2]
    metrics = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    shards = sorted(p.name for p in (latest_checkpoint(run_dir) / "ds" / "state").iterdir())
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shards  # one ZeRO-2 shard per rank
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards
