"""The database and the videos on S3-compatible object storage: a local moto server stands in
for S3 (or MinIO, or any endpoint), and `stiv` reaches it only through the standard AWS
environment variables, as a user on a cluster would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_engine.store import Database, storage_options_from_env
from demos import samples

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

REPO = Path(__file__).resolve().parents[2]
BUCKET = "stiv-test"
DB = f"s3://{BUCKET}/curation/db"


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    """A moto S3 server on a free loopback port, a bucket holding three videos (two good, one
    broken) and a manifest of their s3:// URIs, plus a URI that does not exist."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = dict(os.environ)
        env.update(
            AWS_ACCESS_KEY_ID="test",
            AWS_SECRET_ACCESS_KEY="test",
            AWS_REGION="us-east-1",
            AWS_ENDPOINT_URL=f"http://{host}:{port}",
        )
        env.pop("RAY_ADDRESS", None)  # each `stiv curate` below runs its own embedded Ray
        s3 = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket=BUCKET)
        local = tmp_path_factory.mktemp("s3-videos")
        videos = [
            samples.write_moving_shape_video(local / "moving.mp4", num_frames=50),
            samples.write_hard_cut_video(local / "cuts.mp4", cut_frames=(30, 60), num_frames=90),
        ]
        (local / "zero_bytes.mp4").write_bytes(b"")
        uris = []
        for path in [*videos, local / "zero_bytes.mp4"]:
            s3.upload_file(str(path), BUCKET, f"raw/{path.name}")
            uris.append(f"s3://{BUCKET}/raw/{path.name}")
        uris.append(f"s3://{BUCKET}/raw/absent.mp4")
        manifest = local / "manifest.txt"
        manifest.write_text("# videos on object storage\n" + "\n".join(uris) + "\n")
        yield {"env": env, "manifest": manifest, "s3": s3, "uris": uris}
    finally:
        server.stop()


def _stiv(env: dict, *args: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stiv.cli", *args],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip


def _db(env: dict) -> Database:
    """The database as the CLI opens it: storage options from the environment only."""
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: env[k] for k in keys})
    try:
        return Database(DB)  # resolves storage_options_from_env now; later calls reuse them
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_storage_options_from_env_for_a_plain_http_endpoint(monkeypatch) -> None:
    """Lance refuses an http:// endpoint unless `allow_http` is set: the options built from the
    environment must carry it, with the endpoint, region and credentials."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    options = storage_options_from_env("s3://bucket/db")
    assert options == {
        "aws_access_key_id": "k",
        "aws_secret_access_key": "s",
        "region": "eu-west-1",
        "endpoint": "http://127.0.0.1:9000",
        "allow_http": "true",
    }
    assert storage_options_from_env("/local/db") is None


@pytest.mark.slow
def test_curate_query_snapshot_on_s3(s3_env: dict) -> None:
    """Videos read from s3:// and the Lance database written to s3://: curate, query, count,
    snapshot create/list, and a rerun that resumes (skips everything) must all work through
    the environment's credentials and endpoint alone, and nothing may land on local disk."""
    env, manifest = s3_env["env"], s3_env["manifest"]
    fast = ["--set", "split.min_clip_s=0.8", "--set", "sampling.frames_per_clip=3"]
    run = _stiv(env, "curate", str(manifest), "--db", DB, *fast, "--format", "json")
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert (summary["videos_done"], summary["videos_quarantined"]) == (2, 2)
    assert summary["clips"] == 4, "one shot + three shots"
    assert not (REPO / "s3:").exists(), "an s3:// URI was treated as a local path"

    listed = s3_env["s3"].list_objects_v2(Bucket=BUCKET, Prefix="curation/db/")
    keys = {obj["Key"].split("/")[2] for obj in listed["Contents"]}
    assert {"videos.lance", "clips.lance", "quarantine.lance"} <= keys

    query = _stiv(env, "query", "--db", DB, "--columns", "uri,start_frame,motion_score",
                  "--order-by", "start_frame", "--format", "json")  # fmt: skip
    assert query.returncode == 0, query.stderr[-2000:]
    rows = json.loads(query.stdout)
    assert [r["uri"].rsplit("/", 1)[1] for r in rows].count("cuts.mp4") == 3
    assert all(r["uri"].startswith(f"s3://{BUCKET}/raw/") for r in rows)
    moving = next(r for r in rows if r["uri"].endswith("moving.mp4"))
    assert moving["motion_score"] > 0

    quarantine = _stiv(env, "query", "--db", DB, "--table", "quarantine", "--format", "json")
    reasons = {r["uri"].rsplit("/", 1)[1]: r["error_type"] for r in json.loads(quarantine.stdout)}
    assert reasons == {"zero_bytes.mp4": "empty_file", "absent.mp4": "not_found"}

    count = _stiv(env, "query", "--db", DB, "--where", "start_frame >= 30", "--count")
    assert count.stdout.strip() == "2"

    create = _stiv(env, "snapshot", "create", "--db", DB, "--name", "later-shots",
                   "--where", "start_frame >= 30", "--format", "json")  # fmt: skip
    assert create.returncode == 0, create.stderr[-2000:]
    assert json.loads(create.stdout)["num_rows"] == 2
    listing = _stiv(env, "snapshot", "list", "--db", DB, "--format", "json")
    (snap,) = json.loads(listing.stdout)["snapshots"]
    assert (snap["name"], snap["num_rows"]) == ("later-shots", 2)
    pinned = _db(env).read_snapshot("later-shots", columns=["start_frame"])
    later = sorted(r["start_frame"] for r in rows if r["start_frame"] >= 30)
    assert sorted(pinned.column("start_frame").to_pylist()) == later

    rerun = _stiv(env, "curate", str(manifest), "--db", DB, *fast, "--format", "json")
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    again = json.loads(rerun.stdout.strip().splitlines()[-1])
    # Done videos are skipped; the two broken ones are retried (attempts < max_attempts).
    assert (again["videos_done"], again["videos_skipped"], again["clips"]) == (0, 2, 0)
    assert _db(env).count("clips") == 4, "a rerun must not duplicate clips"


@pytest.mark.slow
def test_unreachable_bucket_fails_with_one_line(s3_env: dict) -> None:
    """A database in a bucket that does not exist must fail fast with exit code 2 and one
    clear line on stderr (CLI contract), not a traceback."""
    result = _stiv(s3_env["env"], "query", "--db", "s3://no-such-bucket/db", timeout_s=60)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no-such-bucket" in result.stderr


@pytest.mark.slow
def test_an_s3_prefix_is_listed_like_a_directory(s3_env: dict) -> None:
    """`stiv curate s3://bucket/prefix/` curates every video under the prefix (it used to be
    taken as one video named after the prefix and curate nothing)."""
    env = s3_env["env"]
    db = f"s3://{BUCKET}/curation/prefix-db"
    fast = ["--set", "split.min_clip_s=0.8", "--set", "sampling.frames_per_clip=3"]
    run = _stiv(env, "curate", f"s3://{BUCKET}/raw/", "--db", db, *fast, "--format", "json")
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    # moving + cuts curated, the empty file quarantined; the manifest and nothing else listed.
    assert (summary["videos_done"], summary["videos_quarantined"]) == (2, 1)
    assert summary["clips"] == 4
