"""The store's query engine on real Lance tables: strict filters, top-k, snapshots, optimize."""

from __future__ import annotations

import pyarrow as pa
import pytest

from data_engine.filters import FilterError, check_filter
from data_engine.store import CLIPS, Database, StoreError

COLUMNS = ["clip_id", "motion_score", "aesthetic_score", "duration_s", "keep"]


def _clips(start: int, num_rows: int) -> pa.Table:
    ids = range(start, start + num_rows)
    return pa.table(
        {
            "clip_id": [f"c{i:04d}" for i in ids],
            "motion_score": pa.array([float(i % 10) for i in ids], pa.float32()),
            "aesthetic_score": pa.array([float((i * 7) % 13) for i in ids], pa.float32()),
            "duration_s": [36.0] * num_rows,
            "keep": [i % 2 == 0 for i in ids],
        }
    )


@pytest.fixture
def db(tmp_path) -> Database:
    database = Database(tmp_path / "db")
    database.write(CLIPS, _clips(0, 100))
    return database


@pytest.mark.parametrize(
    "where, message",
    [
        ("motion_score > 2; anything at all", r"unexpected ';' at character 17"),
        ("motion_score > 2 motion_score < 3", r"unexpected 'motion_score' at character 18"),
        ("motion > 2", r"unknown column 'motion' .*did you mean 'motion_score'"),
        ("motion_score > 2 AND", r"ends too early"),
        ("motion_score + 1", r"not a boolean expression"),
        ("motion_score", r"column 'motion_score' is not boolean"),
        ("motion_score > 2 -- note", r"comments"),
        ("(motion_score > 2))", r"unexpected '\)' at character 19"),
        ("motion_score > 2 UNION SELECT 1", r"unexpected 'UNION'"),
        ("motion_score BETWEEN 2 OR 3", r"expected 'AND' in BETWEEN"),
        ("", r"empty"),
    ],
)
def test_filter_is_exactly_one_boolean_expression(where, message):
    """Lance's parser stops after the first expression and ignored trailing text (`x > 2;
    anything` returned the rows of `x > 2`); every such filter is now refused, naming the
    token or column."""
    with pytest.raises(FilterError, match=message):
        check_filter(where, COLUMNS, ["keep"])


@pytest.mark.parametrize(
    "where",
    [
        "keep",
        "NOT keep AND motion_score >= 2",
        "motion_score BETWEEN 2 AND 20 AND aesthetic_score > 5.5e0",
        "clip_id IN ('c0001', 'c0002') OR clip_id LIKE 'c00%'",
        "motion_score IS NOT NULL AND (aesthetic_score - 1) * 2 > -3",
        "lower(clip_id) = 'c0001' AND CAST(motion_score AS INT) = 1",
        "`motion_score` > 1 AND motion_score NOT IN (1, 2)",
    ],
)
def test_valid_filters_pass(where):
    """The grammar covers what users write with Lance filters (functions, CAST, LIKE, IN)."""
    check_filter(where, COLUMNS, ["keep"])


def test_bad_filter_is_a_one_line_store_error(db):
    """Through the store, the message starts with the filter and stays one line, also for
    type errors that only Lance detects (no Rust source paths)."""
    with pytest.raises(StoreError, match=r"^--where 'motion_score > 2; x': unexpected ';'"):
        db.count(CLIPS, "motion_score > 2; x")
    with pytest.raises(StoreError) as err:
        db.query(CLIPS, "motion_score > 'fast'")
    assert "\n" not in str(err.value) and ".rs:" not in str(err.value)


def test_top_k_matches_a_full_sort(db):
    """`order_by` + `limit` (Lance's top-k) returns the same rows as sorting everything."""
    top = db.query(CLIPS, "keep", ["clip_id", "aesthetic_score"], "aesthetic_score", True, 5)
    full = db.query(CLIPS, "keep", ["clip_id", "aesthetic_score"]).sort_by(
        [("aesthetic_score", "descending")]
    )
    assert top.num_rows == 5
    assert top["aesthetic_score"].to_pylist() == full["aesthetic_score"].to_pylist()[:5]
    asc = db.query(CLIPS, None, ["motion_score"], "motion_score", False, 3)
    assert asc["motion_score"].to_pylist() == [0.0, 0.0, 0.0]


def test_snapshot_returns_pinned_rows_after_the_table_grows(db):
    """Training reads a snapshot by name: rows curated later, and later updates to rows it
    selected, must not leak into it; its count is taken on the pinned version."""
    snap = db.create_snapshot("t2v", "motion_score > 7")
    assert snap.num_rows == db.count(CLIPS, "motion_score > 7") == 20
    before = db.read_snapshot("t2v").sort_by("clip_id")
    db.write(CLIPS, _clips(100, 50))  # more videos curated
    changed = _clips(0, 10).set_column(1, "motion_score", pa.array([9.0] * 10, pa.float32()))
    db.upsert(CLIPS, changed, "clip_id")  # a backfill rewrote scores of pinned rows
    assert db.count(CLIPS, "motion_score > 7") == 20 + 10 + 8  # appended, rescored
    assert db.read_snapshot("t2v").sort_by("clip_id").equals(before)
    assert db.count(snapshot="t2v") == 20
    assert db.count(snapshot="t2v", where="keep") == 10
    assert db.query(snapshot="t2v", columns=["clip_id"]).num_rows == 20
    assert db.count(CLIPS, "motion_score > 7", version=snap.version) == 20
    summary = db.summary(snapshot="t2v")
    assert (summary.num_rows, summary.total_rows) == (20, 100)
    assert summary.hours == pytest.approx(20 * 36 / 3600)


def test_snapshot_name_is_claimed_once(db):
    """A second snapshot of the same name is refused; a tag left by a killed run (no record)
    is reclaimed instead of blocking the name for ever."""
    db.create_snapshot("a", None)
    with pytest.raises(StoreError, match="already exists"):
        db.create_snapshot("a", "keep")
    db.table(CLIPS).tags.create("snapshot-orphan", 1)
    db.write(CLIPS, _clips(100, 5))
    snap = db.create_snapshot("orphan", None)
    assert (snap.version, snap.num_rows) == (db.table(CLIPS).version, 105)


def test_optimize_keeps_tagged_versions_and_drops_the_rest(db):
    """`stiv db optimize` compacts 200 small appends into one fragment, keeps every version
    a snapshot's tag pins readable, and removes the untagged old ones."""
    db.create_snapshot("first", "keep")
    for i in range(5):
        db.write(CLIPS, _clips(100 + i, 1))
    db.create_snapshot("middle", None)
    middle = db.snapshot("middle").version
    for i in range(5):
        db.write(CLIPS, _clips(200 + i, 1))
    report = db.optimize([CLIPS])
    assert report[CLIPS]["fragments_before"] == 11 and report[CLIPS]["fragments_after"] == 1
    versions = {v["version"] for v in db.table(CLIPS).versions()}
    assert versions == {1, middle, db.table(CLIPS).version}
    assert db.count(snapshot="first") == 50 and db.count(snapshot="middle") == 105
    assert db.count(CLIPS) == 110


def _scores(table: pa.Table) -> list[float | None]:
    return table["aesthetic_score"].to_pylist()


def test_cluster_by_sorts_fragments_keeps_rows_and_snapshots_and_prunes(tmp_path):
    """`stiv db optimize --cluster-by aesthetic_score`: every fragment ends up sorted by the
    column (nulls last), the rows and their values are those of before, a snapshot taken
    before still reads its rows, the column gets a zone map the filter uses, and the choice
    is remembered: rows appended later are clustered by the next plain optimize."""
    db = Database(tmp_path / "db")
    rows = _clips(0, 60).append_column("video_id", pa.array([f"v{i // 6}" for i in range(60)]))
    scores = _scores(rows)
    scores[7] = scores[31] = None  # nulls sort last
    rows = rows.set_column(2, "aesthetic_score", pa.array(scores, pa.float32()))
    db.write(CLIPS, rows)
    db.ensure_indexes(CLIPS)
    db.create_snapshot("before", "aesthetic_score > 6")
    pinned = sorted(db.read_snapshot("before", ["clip_id"])["clip_id"].to_pylist())
    every = db.query(CLIPS).sort_by("clip_id")

    report = db.optimize([CLIPS], cluster_by="aesthetic_score")[CLIPS]
    assert report["cluster_by"] == "aesthetic_score" and report["fragments_clustered"] == 1
    stored = db.table(CLIPS).to_table()
    assert _scores(stored)[-2:] == [None, None]
    assert _scores(stored)[:-2] == sorted(s for s in scores if s is not None)
    assert db.query(CLIPS).sort_by("clip_id").equals(every)
    assert sorted(db.read_snapshot("before", ["clip_id"])["clip_id"].to_pylist()) == pinned
    assert db.count(CLIPS, "video_id = 'v3'") == 6  # its BTREE after the rewrite
    plan = db.table(CLIPS).scanner(filter="aesthetic_score > 6", columns=[]).explain_plan()
    assert "ZoneMap" in plan

    db.write(CLIPS, _clips(100, 20))  # unsorted by aesthetic_score
    again = db.optimize([CLIPS])[CLIPS]
    assert again["cluster_by"] == "aesthetic_score" and again["fragments_clustered"] == 1
    fragments = [f.to_table() for f in db.table(CLIPS).get_fragments()]
    assert sum(f.num_rows for f in fragments) == 80
    for fragment in fragments:  # sorted within each fragment, nulls last
        scores = _scores(fragment)
        valid = [s for s in scores if s is not None]
        assert scores == valid + [None] * (len(scores) - len(valid)) and valid == sorted(valid)
    assert db.count(CLIPS, "aesthetic_score > 6") == sum(
        s is not None and s > 6 for f in fragments for s in _scores(f)
    )
    db.optimize([CLIPS])  # may merge the two sorted fragments into one, sorted again
    assert db.optimize([CLIPS])[CLIPS]["fragments_clustered"] == 0  # already in order
    assert db.optimize([CLIPS], cluster_by="none")[CLIPS]["cluster_by"] is None
    assert db.optimize([CLIPS])[CLIPS]["cluster_by"] is None


def test_cluster_by_rejects_unknown_and_unordered_columns(db):
    with pytest.raises(StoreError, match=r"--cluster-by 'nope': no table has this column"):
        db.optimize(cluster_by="nope")
    db.write(CLIPS, pa.table({"clip_id": ["e"], "tags": [["a"]]}))
    with pytest.raises(StoreError, match=r"--cluster-by 'tags': a list<item: string> column"):
        db.optimize(cluster_by="tags")
    assert db.table(CLIPS).metadata.get("stiv.cluster_by") is None


def test_ensure_indexes_refreshes_after_appends(tmp_path):
    """Issue 14: scalar indexes were never refreshed after appends, so new rows were scanned
    without them. After `ensure_indexes`, the index covers every row again."""
    db = Database(tmp_path / "db")
    db.write(CLIPS, _clips(0, 20).append_column("video_id", pa.array(["v"] * 20)))
    db.ensure_indexes(CLIPS)
    db.write(CLIPS, _clips(20, 5).append_column("video_id", pa.array(["w"] * 5)))
    stats = db.table(CLIPS).stats.index_stats("video_id_idx")
    assert stats["num_unindexed_rows"] == 5
    db.ensure_indexes(CLIPS)
    stats = db.table(CLIPS).stats.index_stats("video_id_idx")
    assert stats["num_unindexed_rows"] == 0 and stats["num_indexed_rows"] == 25
    assert db.count(CLIPS, "video_id = 'w'") == 5


def test_top_k_on_a_column_not_selected(db):
    """Lance's top-k plan failed when the sort column was not among the columns asked for."""
    rows = db.query(CLIPS, None, ["clip_id"], "aesthetic_score", True, 2)
    assert rows.column_names == ["clip_id"] and rows.num_rows == 2
