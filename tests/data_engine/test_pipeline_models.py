"""Model stages inside the real pipeline: tiny seeded CLIP, real rapidocr, a real scripted
OpenAI-compatible server for captions and DSG-Video, real Ray actor pools, real Lance."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_engine.config import load_curate_config
from data_engine.pipeline import run_curate
from data_engine.store import Database
from demos import samples
from demos.tiny_models import make_tiny_aesthetic_head, make_tiny_open_clip
from tests.helpers.chat_server import Reply, ScriptedChatServer, request_text

STIV = [sys.executable, "-m", "stiv.cli"]
BASE = ["split.min_clip_s=0.8", "sampling.frames_per_clip=3", "ocr.num_frames=2"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> list[str]:
    """`--set` overrides pointing every CLIP stage at seeded tiny weights on disk."""
    root = tmp_path_factory.mktemp("models")
    name, checkpoint, config = make_tiny_open_clip(root)
    head = make_tiny_aesthetic_head(root / "head.safetensors", embed_dim=32)
    sets = [f"aesthetic.head_path={head}"]
    for stage in ("aesthetic", "embedding", "category"):
        sets += [
            f"{stage}.clip.model_name={name}",
            f"{stage}.clip.checkpoint_path={checkpoint}",
            f"{stage}.clip.model_config_path={config}",
        ]
    return sets


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    samples.write_moving_shape_video(root / "moving.mp4", num_frames=40)
    samples.write_text_overlay_video(root / "subtitles.mp4", num_frames=40)
    samples.write_static_video(root / "static.mp4", num_frames=40)
    return root


@pytest.mark.slow
def test_model_stages_write_scores_with_provenance(
    ray_session, tiny_clip, videos, tmp_path
) -> None:
    """Every model stage runs in its actor pool and writes its columns; provenance says the
    weights were seeded test weights (never presented as real scores); OCR reads real text."""
    cfg = load_curate_config(
        None, [*BASE, *tiny_clip], "probe,split,motion,clarity,ocr,aesthetic,embedding,category"
    )
    summary = run_curate([str(videos)], str(tmp_path / "db"), cfg)
    assert summary.videos_done == 3 and summary.clip_errors == 0
    rows = {
        Path(r["uri"]).name: r
        for r in Database(tmp_path / "db").table("clips").to_table().to_pylist()
    }
    sub, plain = rows["subtitles.mp4"], rows["moving.mp4"]
    assert sub["ocr_text_area"] > 2 * plain["ocr_text_area"]
    assert "HELLO" in sub["ocr_text"].upper()
    for row in rows.values():
        assert len(row["clip_embedding"]) == 32
        assert abs(sum(v * v for v in row["clip_embedding"]) - 1.0) < 1e-4
        assert 0.0 <= row["temporal_consistency"] <= 1.0 + 1e-6
        assert row["category"] and row["aesthetic_score"] is not None
        for stage in ("aesthetic", "embedding", "category"):
            assert json.loads(row[f"{stage}_provenance"])["seeded_test_weights"] is True
    assert rows["static.mp4"]["temporal_consistency"] == pytest.approx(1.0, abs=1e-5)


def test_backfill_adds_a_score_without_touching_other_columns(
    ray_session, tiny_clip, videos, tmp_path
) -> None:
    """`stiv curate --db DB --stages aesthetic` (no INPUT) adds the new column to existing clip
    rows and leaves every other column and the row set unchanged."""
    db_uri = str(tmp_path / "db")
    run_curate([str(videos)], db_uri, load_curate_config(None, BASE))
    db = Database(db_uri)
    before = sorted(db.table("clips").to_table().to_pylist(), key=lambda r: r["clip_id"])
    version_before = db.table("clips").version
    assert "aesthetic_score" not in db.table("clips").schema.names

    summary = run_curate([], db_uri, load_curate_config(None, [*BASE, *tiny_clip], "aesthetic"))
    assert summary.clips == len(before)
    after = sorted(db.table("clips").to_table().to_pylist(), key=lambda r: r["clip_id"])
    assert [{k: r[k] for k in before[0]} for r in after] == before
    assert all(r["aesthetic_score"] is not None for r in after)
    assert db.table("clips").version > version_before

    again = run_curate([], db_uri, load_curate_config(None, [*BASE, *tiny_clip], "aesthetic"))
    assert again.clips == 0, "clips that already have the score are not redone"


@pytest.mark.slow
def test_dedup_flags_the_later_copy_and_text_search_ranks(
    ray_session, tiny_clip, videos, tmp_path
) -> None:
    """A byte-identical copy of a video is flagged `dup_of` the kept (earliest) clip, and
    `stiv query --text` ranks clips through the CLIP model the embeddings name, with --where."""
    root = tmp_path / "in"
    root.mkdir()
    shutil.copy(videos / "moving.mp4", root / "a_moving.mp4")
    shutil.copy(videos / "moving.mp4", root / "b_moving_copy.mp4")
    shutil.copy(videos / "subtitles.mp4", root / "c_subtitles.mp4")
    db_uri = str(tmp_path / "db")
    cfg = load_curate_config(None, [*BASE, *tiny_clip], "probe,split,motion,embedding,dedup")
    run_curate([str(root)], db_uri, cfg)
    rows = {Path(r["uri"]).name: r for r in Database(db_uri).table("clips").to_table().to_pylist()}
    assert rows["a_moving.mp4"]["dup_of"] is None
    assert rows["b_moving_copy.mp4"]["dup_of"] == rows["a_moving.mp4"]["clip_id"]

    out = subprocess.run(
        [*STIV, "query", "--db", db_uri, "--text", "a red square moving", "--limit", "2",
         "--where", "motion_score >= 0", "--format", "json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    ranked = json.loads(out.stdout)
    assert len(ranked) == 2 and ranked[0]["similarity"] >= ranked[1]["similarity"]


def test_missing_weights_fail_before_work_naming_the_key(videos, tmp_path) -> None:
    """A model stage without weights on disk stops the job at start with the config key."""
    out = subprocess.run(
        [*STIV, "curate", str(videos), "--db", str(tmp_path / "db"), "--stages", "probe,split,aesthetic"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert "aesthetic.clip.checkpoint_path" in out.stderr
    assert not (tmp_path / "db" / "clips.lance").exists()


def _scripted(body: dict) -> Reply:
    text = request_text(body)
    if "Davidsonian" in text:
        questions = [
            {"id": 1, "kind": "entity", "object": "square", "question": "Is there a square?", "depends_on": []},
            {"id": 2, "kind": "entity", "object": "dog", "question": "Is there a dog?", "depends_on": []},
            {"id": 3, "kind": "attribute", "object": "square", "question": "Is the square red?", "depends_on": [1]},
        ]  # fmt: skip
        return Reply(content=json.dumps({"questions": questions}))
    if "yes or no" in text:
        return Reply(content="No." if "dog" in text else "Yes, it is.")
    return Reply(content="A red square moves past a dog on a textured background.")


def test_caption_and_dsg_through_the_pipeline(ray_session, videos, tmp_path) -> None:
    """Captions from an OpenAI-compatible server, DSG questions and per-frame checks, claims
    in `dsg_claims`, and `stiv dsg-report` over them: one of two objects is hallucinated in
    every caption, so DSG-Video_i = 50% and DSG-Video_s = 100%."""
    with ScriptedChatServer(responder=_scripted) as server:
        sets = [*BASE]
        for section in ("caption", "dsg_questions", "dsg_verify"):
            sets += [f"{section}.base_url={server.base_url}", f"{section}.model=scripted"]
        cfg = load_curate_config(None, sets, "probe,split,caption,dsg")
        db_uri = str(tmp_path / "db")
        summary = run_curate([str(videos / "moving.mp4"), str(videos / "static.mp4")], db_uri, cfg)
    assert summary.clip_errors == 0
    db = Database(db_uri)
    clips = db.table("clips").to_table().to_pylist()
    assert all(c["caption"].startswith("A red square") for c in clips)
    assert all(c["dsg_num_objects"] == 2 and c["dsg_num_hallucinated"] == 1 for c in clips)
    claims = db.table("dsg_claims").to_table().to_pylist()
    assert len(claims) == 3 * len(clips)
    verdicts = {(c["object"], c["kind"]): c["verdict"] for c in claims}
    assert (
        verdicts[("dog", "entity")] == "hallucinated"
        and verdicts[("square", "attribute")] == "true"
    )
    report = subprocess.run(
        [*STIV, "dsg-report", "--db", db_uri, "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    metrics = json.loads(report.stdout)
    assert metrics["dsg_video_i"] == pytest.approx(50.0) and metrics[
        "dsg_video_s"
    ] == pytest.approx(100.0)
    assert metrics["captions"] == len(clips) and metrics["objects"] == 2 * len(clips)
