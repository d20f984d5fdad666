"""`stiv query`'s engine (Lance via data_engine.store) vs DuckDB over the same rows in Parquet.

For each row count (default 1M and 10M in one run) builds a clips table with synthetic scores
once (cached under --dir, keyed by row count), then times three queries under a 3-predicate
filter that keeps about 0.3% of rows: a count, a two-column fetch, and the top 20 by
aesthetic_score (`--order-by aesthetic_score --desc --limit 20`). Each engine runs in its own
worker process (so one engine's thread pool never slows the other's queries), in alternating
rounds (so machine noise hits all alike); every query opens its table as a fresh CLI call
would. Prints medians and ratios (ours / DuckDB; <= 1.0 meets the target) and the growth of our
time from the smallest to the largest row count (target <= 5x for 10x the rows).

Our table is timed twice: as written, and after `stiv db optimize --cluster-by aesthetic_score`
(each fragment sorted by the column, a zone map on it: data_engine/store.py `cluster`). DuckDB
is timed on the Parquet file as written and, for a like-for-like reference, on the clustered
table's rows written to Parquet in that order (its row-group statistics then prune too).

A curation job commits many times; the first row count is also written as a table that
received its last --append-rows rows in 200 small appends (each followed by `ensure_indexes`,
as the pipeline does), queried as it is and after `Database.optimize` (`stiv db optimize`),
both against the table written in one go (target: optimized <= 1.1x).

    .venv/bin/python bench/query.py [--rows 1000000,10000000] [--rounds 6] [--repeats 9]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FILTER = "aesthetic_score > 7.5 AND motion_score BETWEEN 2 AND 20 AND ocr_text_area < 0.02"
COLUMNS = ["clip_id", "aesthetic_score"]
QUERIES = ("count", "fetch", "top20")
NUM_APPENDS = 200
CLUSTER_BY = "aesthetic_score"  # the filter's most selective column
# Lance tables per engine: written in one go, that table after `stiv db optimize --cluster-by
# aesthetic_score`, and the table of 200 appends before and after a plain optimize.
LANCE_DIRS = {"stiv": "db", "clustered": "db-clustered", "appended": "db-appended",
              "optimized": "db-optimized"}  # fmt: skip


def synthetic_clips(num_rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "clip_id": [f"{i:016x}" for i in range(num_rows)],
            "video_id": [f"{i // 20:016x}" for i in range(num_rows)],
            # Scores are float32, as the clips table stores them (data_engine/pipeline.py).
            "duration_s": rng.uniform(2, 20, num_rows),
            "aesthetic_score": rng.normal(5.0, 1.2, num_rows).astype(np.float32),
            "motion_score": rng.gamma(2.0, 6.0, num_rows).astype(np.float32),
            "clarity_score": rng.gamma(3.0, 100.0, num_rows).astype(np.float32),
            "ocr_text_area": np.clip(rng.exponential(0.08, num_rows), 0, 1).astype(np.float32),
        }
    )


def worker(engine: str, root: Path, repeats: int) -> dict[str, list[float]]:
    """Time `repeats` runs of each query with one engine (after one warm-up each). `stiv`,
    `appended` and `optimized` are the Lance tables written in one go, by 200 appends, and by
    200 appends then optimize."""
    if not engine.startswith("duckdb"):
        from data_engine.store import CLIPS, Database

        db = Database(root / LANCE_DIRS[engine])
        queries = {
            "count": lambda: db.count(CLIPS, FILTER),
            "fetch": lambda: db.query(CLIPS, FILTER, COLUMNS).num_rows,
            "top20": lambda: db.query(CLIPS, FILTER, COLUMNS, "aesthetic_score", True, 20)[
                "clip_id"
            ].to_pylist(),
        }
    else:
        import duckdb

        con = duckdb.connect()
        con.sql("SET threads = 2")
        parquet = "clips-sorted.parquet" if engine == "duckdb-sorted" else "clips.parquet"
        src = f"read_parquet('{root / parquet}')"
        select = f"SELECT {', '.join(COLUMNS)} FROM {src} WHERE {FILTER}"
        queries = {
            "count": lambda: con.sql(f"SELECT count(*) FROM {src} WHERE {FILTER}").fetchall()[0][0],
            "fetch": lambda: con.sql(select).to_arrow_table().num_rows,
            "top20": lambda: (
                con.sql(f"{select} ORDER BY aesthetic_score DESC LIMIT 20")
                .to_arrow_table()["clip_id"]
                .to_pylist()
            ),
        }
    out: dict[str, Any] = {}
    for name, fn in queries.items():
        result = fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = times
        out[f"{name}_result"] = result
    return out


def build(root: Path, num_rows: int, append_rows: int | None) -> None:
    """Write the Parquet file and the Lance table(s) for `num_rows` once (cached in `root`)."""
    from data_engine.store import CLIPS, Database

    root.mkdir(parents=True, exist_ok=True)
    db = Database(root / "db")
    if db.has_table(CLIPS) and (root / "clips.parquet").exists():
        table = None
    else:
        table = synthetic_clips(num_rows)
        pq.write_table(table, root / "clips.parquet")
        db.write(CLIPS, table, mode="overwrite")
        db.ensure_indexes(CLIPS)
    if not (root / "clips-sorted.parquet").exists():
        shutil.rmtree(root / "db-clustered", ignore_errors=True)
        shutil.copytree(root / "db", root / "db-clustered")
        clustered = Database(root / "db-clustered")
        clustered.optimize([CLIPS], cluster_by=CLUSTER_BY)
        # DuckDB given the same advantage: the rows in the clustered table's order, so its
        # row-group statistics prune as well as they can.
        pq.write_table(clustered.table(CLIPS).to_table(), root / "clips-sorted.parquet")
    if append_rows is None or Database(root / "db-optimized").has_table(CLIPS):
        return
    table = table if table is not None else pq.read_table(root / "clips.parquet")
    shutil.rmtree(root / "db-appended", ignore_errors=True)
    appended = Database(root / "db-appended")
    base = num_rows - append_rows
    appended.write(CLIPS, table.slice(0, base), mode="overwrite")
    appended.ensure_indexes(CLIPS)
    step = append_rows // NUM_APPENDS
    for i in range(NUM_APPENDS):
        appended.write(CLIPS, table.slice(base + i * step, step))
        appended.ensure_indexes(CLIPS)
    shutil.rmtree(root / "db-optimized", ignore_errors=True)
    shutil.copytree(root / "db-appended", root / "db-optimized")
    Database(root / "db-optimized").optimize()


def measure(
    root: Path, engines: tuple[str, ...], args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Median seconds per engine and query, engines alternating over `args.rounds` rounds."""
    times: dict[str, dict[str, list[float]]] = {e: {q: [] for q in QUERIES} for e in engines}
    results: dict[str, dict[str, Any]] = {e: {} for e in engines}
    for _ in range(args.rounds):
        for engine in engines:
            cmd = [sys.executable, __file__, "--dir", str(root), "--repeats", str(args.repeats),
                   "--worker", engine]  # fmt: skip
            out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            for name in QUERIES:
                times[engine][name].extend(out[name])
                results[engine][name] = out[f"{name}_result"]
    for engine in engines[1:]:
        for name in QUERIES:
            ours, ref = results[engine][name], results[engines[0]][name]
            if name == "top20":  # ties at the 20th score may pick other ids: compare the set
                ours, ref = len(ours), len(ref)
            assert ours == ref, f"{name}: {engine} and {engines[0]} results differ"
    return {e: {q: statistics.median(t) for q, t in qs.items()} for e, qs in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000000,10000000", help="comma-separated row counts")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--append-rows", type=int, default=100_000)
    parser.add_argument("--dir", default="/tmp/stiv-bench-query")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.dir), args.repeats)))
        return

    sizes = [int(r) for r in args.rows.split(",")]
    medians: dict[int, dict[str, dict[str, float]]] = {}
    print(f"filter: {FILTER}")
    for n in sizes:
        root = Path(args.dir) / f"rows{n}"
        build(root, n, args.append_rows if n == sizes[0] else None)
        medians[n] = measure(root, ("duckdb", "stiv", "clustered", "duckdb-sorted"), args)
        keep = pq.read_metadata(root / "clips.parquet").num_rows
        print(f"rows: {keep:,}")
        for name in QUERIES:
            m = {e: t[name] * 1e3 for e, t in medians[n].items()}
            print(
                f"  {name:>5}: stiv {m['stiv']:7.1f} ms ({m['stiv'] / m['duckdb']:.2f}x)  "
                f"clustered {m['clustered']:7.1f} ms ({m['clustered'] / m['duckdb']:.2f}x)  "
                f"duckdb {m['duckdb']:7.1f} ms  duckdb on sorted Parquet "
                f"{m['duckdb-sorted']:7.1f} ms (clustered / it: "
                f"{m['clustered'] / m['duckdb-sorted']:.2f}x)"
            )
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        for engine in ("stiv", "clustered"):
            growth = "  ".join(
                f"{q} {medians[large][engine][q] / medians[small][engine][q]:.1f}x" for q in QUERIES
            )
            print(f"growth {small:,} -> {large:,} rows ({engine}): {growth}")
    root = Path(args.dir) / f"rows{sizes[0]}"
    after = measure(root, ("stiv", "appended", "optimized"), args)
    print(
        f"after {NUM_APPENDS} appends of {args.append_rows // NUM_APPENDS} rows ({sizes[0]:,} rows):"
    )
    for name in QUERIES:
        one_go = after["stiv"][name]
        print(
            f"  {name:>5}: one go {one_go * 1e3:7.1f} ms  appended {after['appended'][name] * 1e3:7.1f}"
            f" ms ({after['appended'][name] / one_go:.2f}x)  optimized "
            f"{after['optimized'][name] * 1e3:7.1f} ms ({after['optimized'][name] / one_go:.2f}x)"
        )


if __name__ == "__main__":
    main()
