"""`import stiv`: every call of the Python API on a real Lance database, and its errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

import stiv
from data_engine.stages.clip_model import encode_texts, load_open_clip
from data_engine.store import CLIPS, Database
from demos.tiny_models import make_tiny_open_clip

QUERY = "a dog running on a beach"
CAPTIONS = [QUERY, "a red car at night", "snow on a mountain", "a cat asleep", "city traffic"]


@pytest.fixture(scope="module")
def db_uri(tmp_path_factory) -> str:
    """Five clips whose embeddings are tiny-CLIP text embeddings of their captions, with the
    provenance `text_search` checks, so the clip captioned with the query ranks first."""
    root = tmp_path_factory.mktemp("api")
    name, checkpoint, config = make_tiny_open_clip(root / "clip", seed=0)
    model, _, tokenizer, loaded = load_open_clip(
        name, str(checkpoint), config_key="embedding.clip", model_config_path=str(config)
    )
    embeddings = encode_texts(model, tokenizer, CAPTIONS)
    num = len(CAPTIONS)
    table = pa.table(
        {
            "clip_id": [f"c{i}" for i in range(num)],
            "caption": CAPTIONS,
            "motion_score": pa.array([float(i) for i in range(num)], pa.float32()),
            "duration_s": [1800.0] * num,
            "clip_embedding": pa.array(
                embeddings.tolist(), pa.list_(pa.float32(), embeddings.shape[1])
            ),
            "embedding_provenance": [json.dumps({"clip": loaded})] * num,
        }
    )
    Database(root / "db").write(CLIPS, table)
    return str(root / "db")


def test_query_returns_an_arrow_table_sorted_and_limited(db_uri):
    db = stiv.open(db_uri)
    rows = db.query("motion_score >= 1", columns=["clip_id"], order_by="motion_score", desc=True)
    assert isinstance(rows, pa.Table) and rows["clip_id"].to_pylist() == ["c4", "c3", "c2", "c1"]
    assert db.query(limit=2).num_rows == 2
    assert list(db.query("motion_score < 1").to_pandas()["clip_id"]) == ["c0"]


def test_count_and_summary(db_uri):
    db = stiv.open(db_uri)
    assert db.count() == 5 and db.count("motion_score > 2") == 2
    summary = db.summary("motion_score > 2")
    assert (summary.num_rows, summary.total_rows, summary.hours) == (2, 5, 1.0)
    assert summary.share == pytest.approx(0.4)


def test_snapshots_create_show_list_and_read(db_uri, tmp_path):
    db = stiv.open(db_uri)
    snap = db.create_snapshot("api-snap", "motion_score >= 3")
    assert snap.num_rows == 2 and db.snapshot("api-snap") == snap
    assert "api-snap" in [s.name for s in db.snapshots()]
    assert db.query(snapshot="api-snap", columns=["clip_id"])["clip_id"].to_pylist() == ["c3", "c4"]
    assert db.count(snapshot="api-snap") == 2
    assert db.count(version=snap.version) == 5


def test_text_search_ranks_and_honours_order_by(db_uri):
    db = stiv.open(db_uri)
    rows = db.text_search(QUERY, limit=3, columns=["clip_id", "similarity"])
    assert rows.column_names == ["clip_id", "similarity"] and rows["clip_id"][0].as_py() == "c0"
    assert rows["similarity"][0].as_py() == pytest.approx(1.0, abs=1e-4)
    filtered = db.text_search(QUERY, where="motion_score >= 2", limit=2)
    assert "c0" not in filtered["clip_id"].to_pylist() and filtered.num_rows == 2
    by_motion = db.text_search(QUERY, limit=3, order_by="motion_score", desc=True)
    motion = by_motion["motion_score"].to_pylist()
    assert motion == sorted(motion, reverse=True) and len(motion) == 3


def test_to_ray_dataset_reads_the_pinned_snapshot(db_uri, ray_session):
    """Training jobs read a snapshot through Ray Data: its rows, not rows appended later."""
    db = stiv.open(db_uri)
    db.create_snapshot("ray-snap", "motion_score < 2")
    Database(db_uri).write(
        CLIPS, pa.table({"clip_id": ["late"], "motion_score": pa.array([0.5], pa.float32())})
    )
    ds = db.to_ray_dataset(snapshot="ray-snap", columns=["clip_id"])
    assert sorted(r["clip_id"] for r in ds.take_all()) == ["c0", "c1"]
    latest = db.to_ray_dataset(where="motion_score < 2", columns=["clip_id"])
    assert sorted(r["clip_id"] for r in latest.take_all()) == ["c0", "c1", "late"]


def test_optimize_and_tables(tmp_path):
    db = stiv.open(tmp_path / "db")
    for i in range(3):
        Database(tmp_path / "db").write(CLIPS, pa.table({"clip_id": [f"c{i}"]}))
    assert db.tables() == [CLIPS]
    assert db.optimize()[CLIPS]["fragments_after"] == 1
    assert db.count() == 3
    Database(tmp_path / "db").write(CLIPS, pa.table({"clip_id": ["b"]}))
    report = db.optimize(cluster_by="clip_id")[CLIPS]
    assert report["cluster_by"] == "clip_id" and report["fragments_clustered"] == 1
    assert db.query(columns=["clip_id"])["clip_id"].to_pylist() == ["b", "c0", "c1", "c2"]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda db: db.query("motion_score > 2; anything"), r"unexpected ';'"),
        (lambda db: db.query(columns=["nope"]), r"unknown column 'nope'"),
        (lambda db: db.query(desc=True), r"--desc: give --order-by"),
        (lambda db: db.query(table="nope"), r"--table 'nope': no such table"),
        (lambda db: db.query(limit=-1), r"--limit: must be >= 0"),
        (lambda db: db.count("motoin_score > 1"), r"did you mean 'motion_score'"),
        (lambda db: db.summary("motion_score"), r"is not boolean"),
        (lambda db: db.snapshot("missing"), r"no such snapshot"),
        (lambda db: db.query(snapshot="missing"), r"no such snapshot"),
        (lambda db: db.count(snapshot="api-snap", version=1), r"give one"),
        (lambda db: db.create_snapshot("bad name!", None), r"--name 'bad name!'"),
        (lambda db: db.create_snapshot("x", "motion_score >"), r"ends too early"),
        (lambda db: db.text_search(QUERY, limit=0), r"limit: must be >= 1"),
        (lambda db: db.text_search(QUERY, order_by="nope"), r"unknown column 'nope'"),
        (lambda db: db.text_search(QUERY, where="x = 1; y"), r"unexpected ';'"),
        (lambda db: db.to_ray_dataset(columns=["nope"]), r"unknown column 'nope'"),
        (lambda db: db.to_ray_dataset(snapshot="missing"), r"no such snapshot"),
        (lambda db: db.optimize(["nope"]), r"table 'nope' not found"),
        (lambda db: db.optimize(cluster_by="nope"), r"--cluster-by 'nope': no table has"),
    ],
)
def test_every_api_error_is_a_one_line_query_error(db_uri, call, message):
    """Notebook users catch one exception type, with the CLI's one-line message."""
    db = stiv.open(db_uri)
    if not any(s.name == "api-snap" for s in db.snapshots()):
        db.create_snapshot("api-snap", "motion_score >= 3")
    with pytest.raises(stiv.QueryError, match=message) as err:
        call(db)
    assert "\n" not in str(err.value)


def test_text_search_without_embeddings_is_a_query_error(tmp_path):
    Database(tmp_path / "db").write(CLIPS, pa.table({"clip_id": ["c0"]}))
    with pytest.raises(stiv.QueryError, match="run the `embedding` stage first"):
        stiv.open(tmp_path / "db").text_search(QUERY)
