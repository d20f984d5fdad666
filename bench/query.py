"""`stiv query`'s engine (Lance via data_engine.store) vs DuckDB over the same rows in Parquet.

Builds a 1M-row clips table with synthetic scores once (cached under bench_data/), then times
a count and a two-column fetch under a 3-predicate filter that keeps about 0.3% of rows. Each
engine runs in its own worker process (so one engine's thread pool never slows the other's
queries), in alternating rounds (so machine noise hits both alike); every query opens its
table as a fresh CLI call would. Prints medians and ratios (ours / DuckDB; <= 1.0 meets the
target).

    .venv/bin/python bench/query.py [--rows 1000000] [--rounds 6] [--repeats 9]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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


def worker(engine: str, root: Path, repeats: int) -> dict[str, list[float]]:
    """Time `repeats` counts and fetches with one engine (after one warm-up each)."""
    if engine == "stiv":
        from data_engine.store import CLIPS, Database

        db = Database(root / "db")
        queries = {
            "count": lambda: db.count(CLIPS, FILTER),
            "fetch": lambda: db.query(CLIPS, FILTER, COLUMNS).num_rows,
        }
    else:
        import duckdb

        con = duckdb.connect()
        con.sql("SET threads = 2")
        src = f"read_parquet('{root / 'clips.parquet'}')"
        queries = {
            "count": lambda: con.sql(f"SELECT count(*) FROM {src} WHERE {FILTER}").fetchall()[0][0],
            "fetch": lambda: (
                con.sql(f"SELECT {', '.join(COLUMNS)} FROM {src} WHERE {FILTER}")
                .to_arrow_table()
                .num_rows
            ),
        }
    out: dict[str, list[float]] = {}
    for name, fn in queries.items():
        rows = fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = times
        out[f"{name}_rows"] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--dir", default="bench_data/query")
    parser.add_argument("--worker", choices=("stiv", "duckdb"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    root = Path(args.dir) / f"rows{args.rows}-f32"
    if args.worker:
        print(json.dumps(worker(args.worker, root, args.repeats)))
        return
    from data_engine.store import CLIPS, Database

    db = Database(root / "db")
    if not db.has_table(CLIPS) or not (root / "clips.parquet").exists():
        table = synthetic_clips(args.rows)
        db.write(CLIPS, table, mode="overwrite")
        db.ensure_indexes(CLIPS)
        pq.write_table(table, root / "clips.parquet")

    times: dict[str, dict[str, list[float]]] = {"stiv": {}, "duckdb": {}}
    rows: dict[str, dict[str, int]] = {"stiv": {}, "duckdb": {}}
    for _ in range(args.rounds):
        for engine in ("stiv", "duckdb"):
            cmd = [sys.executable, __file__, "--rows", str(args.rows), "--dir", args.dir,
                   "--repeats", str(args.repeats), "--worker", engine]  # fmt: skip
            result = json.loads(
                subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            )
            for name in ("count", "fetch"):
                times[engine].setdefault(name, []).extend(result[name])
                rows[engine][name] = result[f"{name}_rows"]
    print(f"rows: {args.rows:,}  filter: {FILTER}")
    for name in ("count", "fetch"):
        assert rows["stiv"][name] == rows["duckdb"][name], f"{name}: results differ"
        ours = statistics.median(times["stiv"][name])
        duck = statistics.median(times["duckdb"][name])
        n = rows["stiv"][name]
        print(
            f"{name:>5}: stiv {ours * 1e3:7.1f} ms  duckdb {duck * 1e3:7.1f} ms  "
            f"ratio {ours / duck:.2f}x  ({n:,} rows, {100 * n / args.rows:.2f}%)"
        )


if __name__ == "__main__":
    main()
