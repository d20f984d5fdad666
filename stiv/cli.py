"""`stiv`: the one console script (docs/architecture.md "CLI contract").

Exit codes: 0 when the job finished (even with quarantined inputs); 2 with one line on stderr
when it could not run (bad config, bad filter, unreachable storage). Heavy modules are
imported inside each command so `stiv --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


# ------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------


def cmd_curate(args: argparse.Namespace) -> int:
    from data_engine.config import load_curate_config
    from data_engine.pipeline import run_curate

    cfg = load_curate_config(args.config, args.set, args.stages)
    if not args.inputs and args.stages is None:
        raise CliError("curate: give INPUT videos/directories/manifests, or --stages to backfill")
    summary = run_curate(args.inputs, args.db, cfg, address=args.address, verbose=args.verbose)
    if args.format == "json":
        print(json.dumps(summary.as_dict()))
    else:
        print(summary.render())
    return 0


def _database(args: argparse.Namespace):
    from data_engine.store import Database

    return Database(args.db)


def cmd_query(args: argparse.Namespace) -> int:
    import stiv

    db = stiv.open(args.db)
    columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
    where, source = args.where, {"snapshot": args.snapshot, "version": args.version}
    if args.snapshot is None:
        source["table"] = args.table
    elif args.version is not None:
        raise CliError("--snapshot and --version: give one (a snapshot pins its version)")
    if args.count and args.summary:
        raise CliError("--count and --summary: give one")
    if args.text:
        if args.table != "clips":
            raise CliError("--text searches the clips table only")
        if args.count or args.summary:
            raise CliError(
                "--text returns the --limit clips nearest the text; --count/--summary do not "
                "apply (count what a filter keeps with --where ... --count)"
            )
        if args.version is not None:
            raise CliError("--text searches the latest clips or a --snapshot; not a --version")
        rows = db.text_search(
            args.text, where, args.limit or 10, columns, order_by=args.order_by,
            desc=args.desc, snapshot=args.snapshot,
        )  # fmt: skip
    elif args.count:
        print(db.count(where, **source))
        return 0
    elif args.summary:
        summary = db.summary(where, **source)
        if args.format == "json":
            print(json.dumps({**summary.__dict__, "share": summary.share}))
        else:
            print(
                f"{summary.num_rows:,} of {summary.total_rows:,} rows ({100 * summary.share:.2f}%), "
                f"{summary.hours:,.2f} hours of video  [{summary.table}@v{summary.version}, "
                f"where: {summary.where or 'all'}]"
            )
        return 0
    else:
        rows = db.query(where, columns, args.order_by, args.desc, args.limit, **source)
    from data_engine.store import rows_to_json

    if args.format == "json":
        print(rows_to_json(rows))
    elif args.format == "csv":
        import pyarrow.csv as pacsv

        printable = rows.select(
            [n for n in rows.column_names if not _is_nested(rows.schema.field(n).type)]
        )
        pacsv.write_csv(printable, sys.stdout.buffer)
    else:
        _print_table(rows)
    return 0


def _is_nested(tp) -> bool:
    import pyarrow as pa

    return (
        pa.types.is_list(tp)
        or pa.types.is_fixed_size_list(tp)
        or pa.types.is_struct(tp)
        or pa.types.is_binary(tp)
    )


def _print_table(rows) -> None:
    names = [n for n in rows.column_names if not _is_nested(rows.schema.field(n).type)]
    data = rows.select(names).to_pylist()

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        text = "" if v is None else str(v)
        return text if len(text) <= 48 else text[:45] + "..."

    cells = [[fmt(r[n]) for n in names] for r in data]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    print("  ".join(n.ljust(w) for n, w in zip(names, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))
    print(f"({len(data)} rows)")


def cmd_snapshot(args: argparse.Namespace) -> int:
    import stiv

    db = stiv.open(args.db)
    if args.snapshot_cmd == "create":
        snap = db.create_snapshot(args.name, args.where, table=args.table)
        print(
            json.dumps(snap.__dict__)
            if args.format == "json"
            else f"snapshot {snap.name!r}: {snap.num_rows} rows of {snap.table} at version {snap.version} (where: {snap.where or 'all'})"
        )
    elif args.snapshot_cmd == "show":
        snap = db.snapshot(args.name)
        summary = db.summary(snapshot=args.name)
        shown = {**snap.__dict__, "hours": summary.hours, "table_rows": summary.total_rows}
        if args.format == "json":
            print(json.dumps(shown))
        else:
            for key in ("name", "table", "version", "where", "num_rows", "hours", "table_rows"):
                value = shown[key]
                text = f"{value:,.2f}" if isinstance(value, float) else str(value)
                print(f"{key + ':':<12} {text or 'all'}")
    else:
        snaps = db.snapshots()
        if args.format == "json":
            print(json.dumps({"snapshots": [s.__dict__ for s in snaps]}))
        else:
            for s in snaps:
                print(
                    f"{s.name}\t{s.table}@v{s.version}\t{s.num_rows} rows\twhere: {s.where or 'all'}"
                )
            if not snaps:
                print("(no snapshots)")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    import stiv

    report = stiv.open(args.db).optimize(cluster_by=args.cluster_by)
    if args.format == "json":
        print(json.dumps(report))
    else:
        for table, r in report.items():
            clustered = (
                f", clustered by {r['cluster_by']} ({r['fragments_clustered']} rewritten)"
                if r["cluster_by"]
                else ""
            )
            print(
                f"{table}: {r['fragments_before']} -> {r['fragments_after']} fragments"
                f"{clustered}, {r['versions_removed']} old versions removed "
                f"({r['bytes_removed']:,} bytes)"
            )
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from model.info import model_info

    try:
        info = model_info(args.preset)
    except KeyError as err:
        raise CliError(f"--preset: {err.args[0] if err.args else err}") from None
    if args.format == "json":
        print(json.dumps(info))
    else:
        print(f"preset:                      {args.preset}")
        print(f"parameters:                  {info['parameters']:,}")
        print(f"parameters_without_temporal: {info['parameters_without_temporal']:,}")
        for name, count in info["components"].items():
            print(f"  {name:<26} {count:,}")
    return 0


def cmd_dsg_report(args: argparse.Namespace) -> int:
    from data_engine.captioning.report import dsg_report

    db = _database(args)
    rows = db.query("clips", args.where)
    try:
        report = dsg_report(rows)
    except ValueError as err:  # the clips table lacks the dsg stage's columns
        raise CliError(str(err)) from None
    if args.format == "json":
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from data_engine.report.build import write_report

    summary = write_report(
        args.db, args.out, args.where, args.snapshot, max_thumbnails=args.max_thumbnails
    )
    print(summary.render())
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from training.prepare import run_prepare

    summary = run_prepare(args.db, args.snapshot, args.config, args.set, address=args.address)
    print(json.dumps(summary))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from training.dry_run import dry_run
    from training.train import run_train

    if args.dry_run:
        print(json.dumps(dry_run(args.config, args.set, args.bucket), indent=1))
        return 0
    summary = run_train(args.config, args.set, address=args.address, resume=args.resume)
    print(json.dumps(summary))
    return 0


def generate_request(args: argparse.Namespace):
    """The `GenerateRequest` of parsed `stiv generate` flags. Flags left out stay None, so
    every default is the dataclass's (one place)."""
    import dataclasses

    from training.generate import GenerateRequest

    names = {f.name for f in dataclasses.fields(GenerateRequest)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    try:
        return GenerateRequest(**given)
    except ValueError as err:
        raise CliError(str(err)) from None


def cmd_generate(args: argparse.Namespace) -> int:
    from training.generate import run_generate

    print(json.dumps(run_generate(generate_request(args))))
    return 0


def cmd_tiny_models(args: argparse.Namespace) -> int:
    from training.encoders import write_tiny_models

    try:
        print(json.dumps(write_tiny_models(args.out)))
    except FileExistsError as err:
        raise CliError(str(err)) from None
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.checkpoint import export_ema

    if not str(args.out).endswith(".safetensors"):
        raise CliError("--out: weights are exported as safetensors only (use a .safetensors name)")
    print(json.dumps(export_ema(args.run, args.out)))
    return 0


# ------------------------------------------------------------------------------------------
# Parser
# ------------------------------------------------------------------------------------------


DB_HELP = "database directory or URI (s3://...)"
FORMAT_HELP = "table for people, json for one JSON object"
ADDRESS_HELP = "Ray cluster address (default: $RAY_ADDRESS, else an embedded Ray)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stiv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("curate", help="probe, split, score and store videos")
    p.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="video file, directory or .txt manifest"
    )
    p.add_argument("--db", required=True, help=DB_HELP)
    p.add_argument("--config", help="curation YAML (pipelines/curate*.yaml)")
    p.add_argument("--stages", help="comma-separated stages; without INPUT: backfill them")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--format", choices=("table", "json"), default="table", help="summary format")
    p.add_argument(
        "--verbose", action="store_true", help="also show Ray Data's per-operator logs and bars"
    )
    p.set_defaults(func=cmd_curate)

    p = sub.add_parser("query", help="filter, sort and print rows of a table")
    p.add_argument("--db", required=True, help=DB_HELP)
    p.add_argument("--table", default="clips", help="table to read (default: clips)")
    p.add_argument(
        "--where",
        help='one SQL boolean expression, e.g. "aesthetic_score > 5 AND motion_score BETWEEN 2 AND 20"',
    )
    p.add_argument("--columns", help="comma-separated columns")
    p.add_argument("--order-by", help="sort by this column (ascending unless --desc)")
    p.add_argument("--desc", action="store_true", help="sort --order-by descending")
    p.add_argument("--limit", type=int, help="print at most N rows (with --order-by: the top N)")
    p.add_argument(
        "--text", help="rank clips by CLIP text-to-clip similarity (--order-by re-sorts them)"
    )
    p.add_argument("--snapshot", help="read a snapshot's pinned rows (its filter AND --where)")
    p.add_argument("--version", type=int, help="read this table version")
    p.add_argument(
        "--format",
        choices=("table", "json", "csv"),
        default="table",
        help="table, one JSON array of row objects, or CSV",
    )
    p.add_argument("--count", action="store_true", help="print the number of matching rows")
    p.add_argument(
        "--summary", action="store_true", help="print what --where keeps: clips, hours, share"
    )
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("snapshot", help="create, show or list snapshots pinned to table versions")
    ssub = p.add_subparsers(dest="snapshot_cmd", required=True)
    c = ssub.add_parser("create", help="pin the rows a filter selects now under a name")
    c.add_argument("--db", required=True, help=DB_HELP)
    c.add_argument("--name", required=True, help="snapshot name (what prepare --snapshot reads)")
    c.add_argument("--where", default="", help="SQL filter of the rows kept (default: all)")
    c.add_argument("--table", default="clips", help="table to snapshot (default: clips)")
    c.add_argument("--format", choices=("table", "json"), default="table", help=FORMAT_HELP)
    c = ssub.add_parser("show", help="filter, pinned version, rows and hours of one snapshot")
    c.add_argument("name", help="snapshot name")
    c.add_argument("--db", required=True, help=DB_HELP)
    c.add_argument("--format", choices=("table", "json"), default="table", help=FORMAT_HELP)
    c = ssub.add_parser("list", help="every snapshot: name, table, version, rows, filter")
    c.add_argument("--db", required=True, help=DB_HELP)
    c.add_argument("--format", choices=("table", "json"), default="table", help=FORMAT_HELP)
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("db", help="maintain the database")
    dsub = p.add_subparsers(dest="db_cmd", required=True)
    c = dsub.add_parser(
        "optimize",
        help="compact tables, refresh indexes, drop old versions (never a snapshot's)",
    )
    c.add_argument("--db", required=True, help=DB_HELP)
    c.add_argument(
        "--cluster-by",
        metavar="COLUMN",
        help="also sort each fragment by this column (the one your filters select on most), "
        "so they skip the zones they cannot match; remembered by later runs, 'none' stops",
    )
    c.add_argument("--format", choices=("table", "json"), default="table", help=FORMAT_HELP)
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("model-info", help="parameter counts of a model preset")
    p.add_argument("--preset", required=True, help="model preset, e.g. stiv-xl, stiv-tiny-cpu")
    p.add_argument("--format", choices=("table", "json"), default="table", help=FORMAT_HELP)
    p.set_defaults(func=cmd_model_info)

    p = sub.add_parser("dsg-report", help="DSG-Video_i and DSG-Video_s over clips")
    p.add_argument("--db", required=True, help=DB_HELP)
    p.add_argument("--where", help="SQL filter of the clips counted (default: all)")
    p.add_argument("--format", choices=("table", "json"), default="table", help=FORMAT_HELP)
    p.set_defaults(func=cmd_dsg_report)

    p = sub.add_parser("report", help="write a self-contained HTML curation report")
    p.add_argument("--db", required=True, help=DB_HELP)
    chosen = p.add_mutually_exclusive_group()
    chosen.add_argument("--where", help="report on the clips this SQL filter selects")
    chosen.add_argument("--snapshot", help="report on a snapshot's rows at its pinned version")
    p.add_argument("--out", required=True, help="directory for index.html and its images")
    p.add_argument(
        "--max-thumbnails", type=int, default=80, help="clips decoded at most (all sections)"
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("prepare", help="encode a snapshot's clips into a latents table")
    p.add_argument("--db", required=True, help=DB_HELP)
    p.add_argument("--snapshot", required=True, help="snapshot whose clips are encoded")
    p.add_argument("--config", required=True, help="prepare YAML (pipelines/prepare-*.yaml)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    p.add_argument("--address", help=ADDRESS_HELP)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a STIV stage with Ray Train + DeepSpeed")
    p.add_argument("--config", required=True, help="stage YAML (pipelines/train-*.yaml)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default="auto",
        choices=("auto", "require"),
        help="continue from the latest checkpoint when there is one (the default; "
        "--resume=require: fail when there is none)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, parameters, FLOPs, tokens per bucket, estimated memory "
        "per rank and ZeRO partition sizes, then exit (no Ray)",
    )
    p.add_argument(
        "--bucket",
        action="append",
        metavar="FxHxW",
        help="--dry-run without a latents table: a bucket shape in pixels, e.g. 20x256x256",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "generate", help="every STIV application (docs/applications.md) from a checkpoint"
    )
    # No defaults here: cmd_generate leaves out what is not given, and GenerateRequest
    # (training/generate.py) holds every default.
    p.add_argument("--checkpoint", required=True, help="run directory or exported .safetensors")
    p.add_argument("--prompt", required=True, help="the caption to generate from")
    p.add_argument(
        "--mode",
        choices=("t2v", "ti2v", "predict", "interpolate", "upsample", "long", "multiview"),
        help="what to generate (default: from the inputs: t2v, ti2v, interpolate or predict)",
    )
    p.add_argument(
        "--image", help="first frame (ti2v, interpolate, long) or input view (multiview)"
    )
    p.add_argument("--last-image", help="last frame (interpolate, with --image)")
    p.add_argument("--video", help="predict: condition on its first frames; upsample: the input")
    p.add_argument("--given-frames", type=int, help="predict: frames taken from --video (4)")
    p.add_argument("--upsampler", help="a TUP run cascaded after the mode (doubles the frames)")
    p.add_argument("--keyframes", type=int, help="long: keyframes generated first (--frames)")
    p.add_argument(
        "--keyframe-stride", type=int, help="long: frames between keyframes (--frames - 1)"
    )
    p.add_argument(
        "--frame-stride", type=int, help="stride micro-condition (default: the run's task)"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="where to sample (cpu)")
    p.add_argument("--cfg-scale", type=float, help="JIT-CFG scale (7.5; 1.0 = conditional only)")
    p.add_argument("--steps", type=int, help="sampling steps per call (50)")
    p.add_argument("--solver", choices=("euler", "heun"), help="ODE solver (euler)")
    p.add_argument("--seed", type=int, help="initial noise seed (0)")
    p.add_argument(
        "--shift",
        type=float,
        help="time-grid shift towards noise (default: the model's training timestep_shift)",
    )
    p.add_argument("--frames", type=int, help="frames per sampling window (8)")
    p.add_argument("--height", type=int, help="pixels (32)")
    p.add_argument("--width", type=int, help="pixels (32)")
    p.add_argument("--fps", type=int, help="of the MP4 (8)")
    p.add_argument("--out", help="MP4 path (generated.mp4); a PNG strip is written beside it")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "tiny-models", help="write the seeded tiny encoders the *-tiny-cpu pipelines name"
    )
    p.add_argument("--out", default="models", help="directory (pipelines expect models/)")
    p.set_defaults(func=cmd_tiny_models)

    p = sub.add_parser("export", help="consolidated EMA weights + config as one safetensors file")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--out", required=True, help="model.safetensors")
    p.set_defaults(func=cmd_export)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from data_engine.stages.base import StageError
    from data_engine.store import StoreError
    from stiv.api import QueryError
    from stiv_core.config import ConfigError
    from training.checkpoint import CheckpointError

    return (
        CliError, ConfigError, QueryError, StoreError, StageError, CheckpointError,
        FileNotFoundError,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _user_errors() as err:
        print(f"stiv {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
