"""`stiv report` cost: against its floor on the demo database, and on a 1M-row table.

1. Demo database (`--db`, default demo_data/db; built like `make demo` in a temp dir when it is
   missing): times, as whole processes, `stiv report`, `stiv query --count`, and the decoding of
   exactly the report's thumbnails alone (this script with `--decode-only`, the same clips and
   times read from the report's report.json). Prints the medians and
   ratio = report / (count + decode); target <= 1.5.
2. Synthetic clips tables of `--rows` (default 250k and 1M) rows pointing at a few real
   videos: times `stiv report --max-thumbnails N` and its peak resident memory (the child's
   ru_maxrss). Target: under 30 s at 1M rows on 2 cores, and memory that does not grow with the
   row count (the scan keeps fixed-size counts and a fixed-size sample).

    .venv/bin/python bench/report.py [--db demo_data/db] [--rows 250000,1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
STIV = [sys.executable, "-m", "stiv.cli"]
BATCH_ROWS = 100_000  # rows per written batch of the synthetic table
CATEGORIES = ["people", "animals", "nature and landscapes", "city and streets", "vehicles"]


def _timed(command: list[str], cwd: Path = REPO) -> tuple[float, int]:
    """(wall seconds, peak RSS in MiB) of one command run as its own process."""
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *command], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.split()
    return float(out[0]), int(out[1]) // 1024


def _median(command: list[str], repeats: int) -> float:
    return statistics.median(_timed(command)[0] for _ in range(repeats))


# ------------------------------------------------------------------------------------------
# 1. The demo database


def _demo_db(root: Path) -> Path:
    """Build the demo database as `make demo` does (about two minutes on 2 cores)."""
    print(f"building the demo database under {root} (as `make demo`)", flush=True)
    subprocess.run([sys.executable, "-m", "demos.demo", "demo_data"], cwd=root, check=True)
    config = str(REPO / "pipelines" / "curate-demo.yaml")
    subprocess.run(
        [*STIV, "curate", "demo_data/videos", "--db", "demo_data/db", "--config", config],
        cwd=root,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return root / "demo_data" / "db"


def decode_only(report_json: Path, out_dir: Path) -> None:
    """Decode the thumbnails a report decoded, and nothing else (the floor of its decoding)."""
    from data_engine.report.thumbs import THUMB_FIELDS, ThumbRequest, write_thumbnails

    record = json.loads(report_json.read_text())
    requests = [
        ThumbRequest(**{k: v for k, v in t.items() if k in THUMB_FIELDS})
        for t in record["thumbnails"]
    ]
    write_thumbnails(requests, out_dir, height_px=record["thumb_height_px"], progress=False)


def bench_demo(db: Path, repeats: int, work: Path) -> None:
    out = work / "demo-report"
    report = [*STIV, "report", "--db", str(db), "--out", str(out)]
    count = [*STIV, "query", "--db", str(db), "--count"]
    decode = [sys.executable, __file__, "--decode-only", str(out / "report.json"), str(work / "d")]
    subprocess.run(report, cwd=REPO, check=True, capture_output=True)  # warm the file cache
    t_report = _median(report, repeats)
    t_count = _median(count, repeats)
    t_decode = _median(decode, repeats)
    thumbs = len(json.loads((out / "report.json").read_text())["thumbnails"])
    ratio = t_report / (t_count + t_decode)
    print(f"demo database {db}: {thumbs} thumbnails, medians of {repeats}")
    print(f"  stiv report            {t_report:6.2f} s")
    print(f"  stiv query --count     {t_count:6.2f} s")
    print(f"  thumbnail decode alone {t_decode:6.2f} s")
    print(f"  ratio report / (count + decode) = {ratio:.2f}x (target <= 1.5x)")


# ------------------------------------------------------------------------------------------
# 2. Synthetic tables


def _sample_videos(root: Path) -> list[tuple[str, float, int, int, int]]:
    """(uri, duration_s, width, height, rotation_deg) of four real H.264 files."""
    from demos.samples import (
        write_hard_cut_video,
        write_moving_shape_video,
        write_rotated_video,
        write_static_video,
    )

    return [
        (str(write_moving_shape_video(root / "moving.mp4", 100, pan_px=2.0)), 4.0, 320, 240, 0),
        (str(write_hard_cut_video(root / "cuts.mp4", (50, 100), 150)), 6.0, 320, 240, 0),
        (str(write_static_video(root / "static.mp4", 75)), 3.0, 320, 240, 0),
        (str(write_rotated_video(root / "portrait.mp4", 90, 75)), 3.0, 240, 320, 90),
    ]


def _clip_batches(
    rows: int, videos: list[tuple[str, float, int, int, int]]
) -> Iterator[pa.RecordBatch]:
    """Clip rows with the pipeline's columns: 1 s clips cycling over the videos' time ranges."""
    rng = np.random.default_rng(0)
    for start in range(0, rows, BATCH_ROWS):
        n = min(BATCH_ROWS, rows - start)
        index = np.arange(start, start + n)
        video = index % len(videos)
        durations = np.array([v[1] for v in videos])[video]
        start_s = np.floor(rng.uniform(0, durations - 1.0))
        dup = np.where(rng.random(n) < 0.05, index - 1, -1)
        yield pa.RecordBatch.from_pydict(
            {
                "clip_id": [f"clip{i:09d}" for i in index],
                "video_id": [f"video{v}" for v in video],
                "uri": [videos[v][0] for v in video],
                "start_s": start_s,
                "end_s": start_s + 1.0,
                "duration_s": np.ones(n),
                "fps": np.full(n, 25.0),
                "width": np.array([v[2] for v in videos])[video],
                "height": np.array([v[3] for v in videos])[video],
                "motion_score": rng.gamma(2.0, 3.0, n).astype(np.float32),
                "clarity_score": rng.lognormal(4.0, 1.0, n).astype(np.float32),
                "aesthetic_score": rng.normal(5.0, 1.0, n).astype(np.float32),
                "ocr_text_area": rng.beta(0.5, 20.0, n).astype(np.float32),
                "temporal_consistency": rng.uniform(0.7, 1.0, n).astype(np.float32),
                "category": [CATEGORIES[c] for c in rng.integers(0, len(CATEGORIES), n)],
                "dup_of": [f"clip{d:09d}" if d >= 0 else None for d in dup],
                "aesthetic_provenance": ['{"model_name": "synthetic"}'] * n,
            }
        )


def _synthetic_db(root: Path, rows: int, videos: list[tuple[str, float, int, int, int]]) -> Path:
    import lance

    from data_engine.store import Database

    db = Database(root / f"db-{rows}")
    batches = _clip_batches(rows, videos)
    first = next(batches)
    reader = pa.RecordBatchReader.from_batches(first.schema, [first, *batches])
    lance.write_dataset(reader, db.uri_for("clips"), mode="overwrite")
    video_rows = [
        {
            "video_id": f"video{i}",
            "uri": uri,
            "status": "done",
            "duration_s": duration,
            "width": w,
            "height": h,
            "rotation_deg": rotation,
            "updated_at": time.time(),
        }
        for i, (uri, duration, w, h, rotation) in enumerate(videos)
    ]
    db.write("videos", pa.Table.from_pylist(video_rows))
    db.create_snapshot("sharp-moving", "motion_score > 2 AND clarity_score BETWEEN 20 AND 400")
    return Path(db.uri)


def bench_synthetic(rows_list: list[int], max_thumbnails: int, work: Path) -> None:
    videos = _sample_videos(work / "videos")
    for rows in rows_list:
        started = time.perf_counter()
        db = _synthetic_db(work, rows, videos)
        built = time.perf_counter() - started
        out = work / f"report-{rows}"
        seconds, rss_mib = _timed(
            [*STIV, "report", "--db", str(db), "--out", str(out), "--max-thumbnails",
             str(max_thumbnails)]
        )  # fmt: skip
        verdict = "meets" if seconds < 30 else "MISSES"
        print(
            f"{rows:>9,} rows (table written in {built:.1f} s): stiv report {seconds:.2f} s, "
            f"peak RSS {rss_mib} MiB, {max_thumbnails} thumbnails ({verdict} < 30 s)"
        )
        shutil.rmtree(db)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="demo database (default demo_data/db, built if missing)")
    parser.add_argument("--rows", default="250000,1000000", help="synthetic table sizes")
    parser.add_argument("--max-thumbnails", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-only", nargs=2, metavar=("REPORT_JSON", "OUT_DIR"))
    args = parser.parse_args()
    if args.decode_only:
        decode_only(Path(args.decode_only[0]), Path(args.decode_only[1]))
        return
    with tempfile.TemporaryDirectory(prefix="stiv-bench-report-") as tmp:
        work = Path(tmp)
        db = Path(args.db) if args.db else REPO / "demo_data" / "db"
        if not db.is_dir():
            db = _demo_db(work)
        bench_demo(db.absolute(), args.repeats, work)
        bench_synthetic([int(r) for r in args.rows.split(",")], args.max_thumbnails, work)


if __name__ == "__main__":
    main()
