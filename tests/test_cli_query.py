"""`stiv query`, `stiv snapshot` and `stiv db optimize` through the CLI entry point."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from data_engine.store import CLIPS, Database
from stiv.cli import main


@pytest.fixture
def db_uri(tmp_path) -> str:
    num = 10
    Database(tmp_path / "db").write(
        CLIPS,
        pa.table(
            {
                "clip_id": [f"c{i}" for i in range(num)],
                "motion_score": pa.array([float(i) for i in range(num)], pa.float32()),
                "duration_s": [360.0] * num,
            }
        ),
    )
    return str(tmp_path / "db")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_trailing_text_in_a_filter_exits_2(db_uri, capsys):
    """`--where "motion_score > 2; anything at all"` used to exit 0 with the rows of
    `motion_score > 2`; a snapshot stored the whole text."""
    for argv in (
        ["query", "--db", db_uri, "--where", "motion_score > 2; anything at all"],
        ["snapshot", "create", "--db", db_uri, "--name", "s", "--where", "motion_score > 2; x"],
    ):
        code, out, err = _run(capsys, *argv)
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and "unexpected ';' at character 17" in err
    assert _run(capsys, "snapshot", "list", "--db", db_uri)[1] == "(no snapshots)\n"


@pytest.mark.parametrize("flag", ["--count", "--summary"])
def test_text_with_count_or_summary_exits_2(db_uri, capsys, flag):
    """`--text` ranks the nearest --limit clips; counting them was silently ignored."""
    code, out, err = _run(capsys, "query", "--db", db_uri, "--text", "a dog", flag)
    assert code == 2 and out == "" and "--count/--summary do not apply" in err


def test_desc_without_order_by_exits_2(db_uri, capsys):
    code, _, err = _run(capsys, "query", "--db", db_uri, "--desc")
    assert code == 2 and "--desc: give --order-by" in err


def test_count_summary_and_top_k(db_uri, capsys):
    assert (
        _run(capsys, "query", "--db", db_uri, "--where", "motion_score > 6", "--count")[1] == "3\n"
    )
    code, out, _ = _run(
        capsys, "query", "--db", db_uri, "--where", "motion_score > 6", "--summary",
        "--format", "json",
    )  # fmt: skip
    summary = json.loads(out)
    assert code == 0 and (summary["num_rows"], summary["total_rows"]) == (3, 10)
    assert summary["hours"] == pytest.approx(0.3) and summary["share"] == pytest.approx(0.3)
    code, out, _ = _run(
        capsys, "query", "--db", db_uri, "--order-by", "motion_score", "--desc", "--limit", "2",
        "--columns", "clip_id", "--format", "json",
    )  # fmt: skip
    assert json.loads(out) == [{"clip_id": "c9"}, {"clip_id": "c8"}]


def test_snapshot_show_and_query_by_snapshot_and_version(db_uri, capsys):
    """`--snapshot` and `--version` read the pinned rows after the table grew."""
    _run(
        capsys, "snapshot", "create", "--db", db_uri, "--name", "t2v", "--where", "motion_score > 7"
    )
    Database(db_uri).write(
        CLIPS, pa.table({"clip_id": ["new"], "motion_score": pa.array([50.0], pa.float32())})
    )
    code, out, _ = _run(capsys, "snapshot", "show", "t2v", "--db", db_uri, "--format", "json")
    shown = json.loads(out)
    assert code == 0 and shown["where"] == "motion_score > 7" and shown["num_rows"] == 2
    assert shown["version"] == 1 and shown["hours"] == pytest.approx(0.2)
    assert _run(capsys, "query", "--db", db_uri, "--snapshot", "t2v", "--count")[1] == "2\n"
    assert _run(capsys, "query", "--db", db_uri, "--version", "1", "--count")[1] == "10\n"
    assert _run(capsys, "query", "--db", db_uri, "--count")[1] == "11\n"
    code, _, err = _run(capsys, "snapshot", "show", "nope", "--db", db_uri)
    assert code == 2 and "no such snapshot" in err


def test_db_optimize_keeps_snapshots_readable(db_uri, capsys):
    _run(capsys, "snapshot", "create", "--db", db_uri, "--name", "keep", "--where", "")
    for i in range(3):
        Database(db_uri).write(CLIPS, pa.table({"clip_id": [f"n{i}"]}))
    code, out, _ = _run(capsys, "db", "optimize", "--db", db_uri, "--format", "json")
    assert code == 0 and json.loads(out)[CLIPS]["fragments_after"] == 1
    assert _run(capsys, "query", "--db", db_uri, "--snapshot", "keep", "--count")[1] == "10\n"
    assert _run(capsys, "query", "--db", db_uri, "--count")[1] == "13\n"


def test_db_optimize_cluster_by(db_uri, capsys):
    code, out, _ = _run(capsys, "db", "optimize", "--db", db_uri, "--cluster-by", "clip_id")
    assert code == 0 and "clips: 1 -> 1 fragments, clustered by clip_id" in out
    code, _, err = _run(capsys, "db", "optimize", "--db", db_uri, "--cluster-by", "nope")
    assert code == 2 and "--cluster-by 'nope': no table has this column" in err
