"""`ray job submit` end to end, exactly as docs/cluster.md and the README's cluster section
type it, on a local 2-node cluster (`ray start` head with the dashboard's job server, plus a
worker node): `ray job submit --address http://127.0.0.1:PORT --working-dir . -- stiv curate
...`, then `stiv prepare --address` from a driver outside the cluster (on the cluster's Ray
Data), then `-- stiv train ...` with one ZeRO-2 rank per node, which loses its worker node
mid-run. Logs stream back to the submitting terminal; rows, latents and checkpoints appear in
the shared database and run directory.

One test, one cluster: each phase needs the one before, and a cluster start, a prepare and a
Ray Train start each cost 15-35 s on 2 cores."""

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

    def job_submit_start(self, *entrypoint: str, working_dir: bool = True) -> subprocess.Popen:
        """`ray job submit` as a user types it, running: its stdout streams the job's logs until
        the job ends. Without `working_dir` the job runs the code installed on the nodes (as in
        the container image), from the directory the nodes were started in."""
        upload = ["--working-dir", "."] if working_dir else []
        return subprocess.Popen(
            [RAY, "job", "submit", "--address", self.dashboard, *upload, "--", *entrypoint],
            cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def job_submit(self, *entrypoint: str, timeout_s: float = 420) -> str:
        """`ray job submit`, waited for; returns everything it printed."""
        return _job_output(self.job_submit_start(*entrypoint), entrypoint, timeout_s)


def _job_output(submitter: subprocess.Popen, entrypoint: tuple[str, ...], timeout_s: float) -> str:
    try:
        out, err = submitter.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        submitter.kill()
        out, err = submitter.communicate()
    if submitter.returncode != 0 or "succeeded" not in out.lower():
        pytest.fail(
            f"{' '.join(entrypoint[:2])}: rc {submitter.returncode}\n{out[-5000:]}\n{err[-3000:]}"
        )
    return out


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
def test_curate_prepare_then_train_through_losing_a_node(
    cluster: DashboardCluster, tmp_path: Path
) -> None:
    """Curation submitted with `ray job submit`; latents from `stiv prepare --address`; then a
    2-rank ZeRO-2 stage (one rank per node, STRICT_SPREAD) as a job whose worker node dies
    mid-run (all its processes at once) while a replacement node joins. Ray Train's
    FailureConfig restarts the ranks from the latest checkpoint: the job succeeds, every step
    is logged exactly once, and the last checkpoint holds one optimizer shard per rank."""
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
    prepared = subprocess.run(
        [sys.executable, "-m", "stiv.cli", "prepare", "--db", str(db), "--snapshot", "shapes",
         "--config", "pipelines/prepare-tiny-cpu.yaml", "--set", f"encoder.text_path={text}",
         "--address", cluster.address],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert _last_json(prepared.stdout, "latents_table")["written"] == clips.num_rows

    run_dir, steps, kill_after = tmp_path / "runs" / "t2v", 20, 8
    sets = [
        f"db={db}", f"run_dir={run_dir}", f"max_steps={steps}", "checkpoint_every=4",
        "log_every=1", "init_from.mode=none", "init_from.run_dir=", "data.batch_size=2",
        "scaling.num_workers=2", "scaling.placement_strategy=STRICT_SPREAD",
        "scaling.zero_stage=2", "scaling.data_cpus=1.0", "scaling.cpus_per_worker=0",
        "scaling.max_failures=3",
    ]  # fmt: skip
    entrypoint = (
        "stiv", "train", "--config", str(REPO / "pipelines/train-t2v-tiny-cpu.yaml"), "--resume",
        *[arg for s in sets for arg in ("--set", s)],
    )  # fmt: skip
    # No --working-dir for this job: both nodes share one session directory on this machine,
    # and the replacement node unpacks the working-dir package again over the one the driver
    # runs in (on separate machines each node has its own copy).
    submitter = cluster.job_submit_start(*entrypoint, working_dir=False)
    metrics_file = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= kill_after):
        assert submitter.poll() is None, submitter.communicate()[0][-5000:]
        assert time.monotonic() < deadline, "no training progress within 300 s"
        time.sleep(0.2)
    logged_at_kill = len(metrics_file.read_text().splitlines())
    cluster.kill(cluster.nodes[-1])
    cluster.add_worker()  # the replacement machine
    trained = _job_output(submitter, entrypoint, timeout_s=600)

    result = _last_json(trained, "run_dir")
    assert result["steps"] == steps and result["num_workers"] == 2
    assert kill_after <= logged_at_kill < steps, "the node must die mid-run"
    # Rank 0 prints its batch sizes once per worker-group start, into Ray's worker logs (one
    # session directory for both nodes here): the first start plus at least one restart.
    logs = cluster.temp_dir / "session_latest" / "logs"
    starts = sum(
        p.read_text(errors="replace").count("per-rank batch sizes: ")
        for p in logs.glob("worker-*.out")
    )
    assert starts >= 2, f"{starts} worker-group start(s) logged under {logs}"
    metrics = [json.loads(ln) for ln in metrics_file.read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert list_checkpoints(run_dir)[-1][0] == steps
    shards = sorted(p.name for p in (latest_checkpoint(run_dir) / "ds" / "state").iterdir())
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shards  # one ZeRO-2 shard per rank
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards
