"""`stiv query`'s engine (Lance via data_engine.store) vs DuckDB over the same rows in Parquet.

Builds a 1M-row clips table with synthetic scores once (cached under bench_data/), then times,
in one run and interleaved, a count and a two-column fetch under a 3-predicate filter that
keeps about 0.3% of rows. Prints medians and ratios (ours / DuckDB; <= 1.0 meets the target).

    .venv/bin/python bench/query.py [--rows 1000000] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_engine.store import CLIPS, Database

FILTER = "aesthetic_score > 7.5 AND motion_score BETWEEN 2 AND 20 AND ocr_text_area < 0.02"
COLUMNS = ["clip_id", "aesthetic_score"]


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


def timed_pair(ours, theirs, repeats: int) -> tuple[float, float, object, object]:
    """Medians of alternating runs, so machine noise hits both sides alike."""
    times: dict[int, list[float]] = {0: [], 1: []}
    results: list[object] = [None, None]
    for _ in range(repeats):
        for side, fn in enumerate((ours, theirs)):
            start = time.perf_counter()
            results[side] = fn()
            times[side].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1]), results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--dir", default="bench_data/query")
    args = parser.parse_args()

    root = Path(args.dir) / f"rows{args.rows}-f32"
    db = Database(root / "db")
    parquet = root / "clips.parquet"
    if not db.has_table(CLIPS) or not parquet.exists():
        table = synthetic_clips(args.rows)
        db.write(CLIPS, table, mode="overwrite")
        db.ensure_indexes(CLIPS)
        pq.write_table(table, parquet)
    con = duckdb.connect()
    con.sql("SET threads = 2")
    src = f"read_parquet('{parquet}')"

    def ours_count():
        return db.count(CLIPS, FILTER)

    def duck_count():
        return con.sql(f"SELECT count(*) FROM {src} WHERE {FILTER}").fetchall()[0][0]

    def ours_fetch():
        return db.query(CLIPS, FILTER, COLUMNS).num_rows

    def duck_fetch():
        return (
            con.sql(f"SELECT {', '.join(COLUMNS)} FROM {src} WHERE {FILTER}")
            .to_arrow_table()
            .num_rows
        )

    for fn in (ours_count, duck_count, ours_fetch, duck_fetch):  # warm caches equally
        fn()
    results = {}
    for name, ours, duck in (("count", ours_count, duck_count), ("fetch", ours_fetch, duck_fetch)):
        t_ours, t_duck, n_ours, n_duck = timed_pair(ours, duck, args.repeats)
        assert n_ours == n_duck, f"{name}: row counts differ ({n_ours} vs {n_duck})"
        results[name] = (t_ours, t_duck, n_ours)
    print(f"rows: {args.rows:,}  filter: {FILTER}")
    for name, (t_ours, t_duck, n) in results.items():
        print(
            f"{name:>5}: stiv {t_ours * 1e3:7.1f} ms  duckdb {t_duck * 1e3:7.1f} ms  "
            f"ratio {t_ours / t_duck:.2f}x  ({n:,} rows, {100 * n / args.rows:.2f}%)"
        )


if __name__ == "__main__":
    main()
