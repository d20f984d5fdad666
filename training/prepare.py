"""`stiv prepare`: a snapshot's clips -> a latents table of fixed-shape training samples.

Ray Data end to end (docs/architecture.md "Data flow"):
  snapshot rows (driver: bucket choice, resume filter)
  -> decode + crop      CPU tasks: frames at the stage's stride, cropped and resized to a bucket
  -> encode latents     actor pool: frozen VAE or pixel encoder, loaded once per actor
  -> encode captions    actor pool: frozen CLIP text encoder, loaded once per actor
  -> lance_ray.write_lance (append)

Each bucket is one (num_frames, height, width) shape, so a training batch drawn from one bucket
stacks without padding (docs/design-notes.md "Training input: buckets and resume are ours").
The table's schema and byte codec are `training.latents`. The crop box in original pixels, the original size and the frame stride are kept as
micro-conditions (`model.config.MICRO_COND_NAMES`; docs/recipe.md "The singleton condition").

A second table `<latents_table>_meta` (one row) records the encoders that produced the latents
and the encoded empty prompt, which training uses for text dropout (docs/recipe.md
"Condition dropout": the null text is the encoded empty string, not zeros).

Resumable like curation: a rerun skips the clip_ids already in the latents table; a clip that
cannot be decoded becomes a `quarantine` row (key `video_id/clip_id/prepare`, through
`data_engine.quarantine`) and is retried on the next run until it has failed `max_attempts`
times; a later success removes its row. Decode tasks hand their failures to one collector
actor and the driver writes them in one upsert, so no two workers commit to the table at once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_engine import quarantine
from data_engine.store import Database
from model.config import MICRO_COND_NAMES
from stiv_core.config import ConfigError, save_config
from stiv_core.ray_connect import connect_ray
from stiv_core.uris import is_local
from training.latents import (
    LATENTS_SCHEMA,
    empty_prompt_fields,
    meta_table_name,
)
from training.prepare_config import EncoderConfig, PrepareConfig, load_prepare_config
from training.prepare_stages import (
    FailureLog,
    LatentEncodeActor,
    TextEncodeActor,
    choose_bucket,
    decode_item,
    stable_id,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# --------------------------------------------------------------------------- driver


def _source_rows(db: Database, cfg: PrepareConfig) -> pa.Table:
    """Rows to prepare: snapshot clips, or images from a directory (image_source=dir)."""
    if cfg.mode == "image" and cfg.image_source == "dir":
        rows = []
        for path in sorted(Path(cfg.image_dir).rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            import cv2

            caption_file = path.with_suffix(".txt")
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            rows.append(
                {
                    "clip_id": stable_id(str(path.resolve())),
                    "video_id": None,
                    "uri": str(path.resolve()),
                    "start_frame": 0,
                    "end_frame": 1,
                    "height": 0 if image is None else image.shape[0],
                    "width": 0 if image is None else image.shape[1],
                    "caption": caption_file.read_text().strip() if caption_file.is_file() else None,
                }
            )
        return pa.Table.from_pylist(rows)
    if not cfg.snapshot:
        raise ConfigError("snapshot: name the snapshot to prepare (--snapshot or `snapshot:`)")
    columns = ["clip_id", "video_id", "uri", "start_frame", "end_frame", "width", "height"]
    table = db.read_snapshot(cfg.snapshot)
    if cfg.caption_column not in table.column_names:
        raise ConfigError(
            f"caption_column: snapshot {cfg.snapshot!r} has no column {cfg.caption_column!r} "
            "(caption the clips with `stiv curate --stages caption`, or set caption_column)"
        )
    return table.select([*columns, cfg.caption_column]).rename_columns([*columns, "caption"])


def prepare_key(row: dict[str, Any]) -> str:
    """The clip's quarantine key, `video_id/clip_id/prepare` (images from a directory have no
    video: their clip_id stands in)."""
    return quarantine.quarantine_key(
        row.get("video_id") or row["clip_id"], row["clip_id"], "prepare"
    )


def _plan(
    source: pa.Table,
    cfg: PrepareConfig,
    done: set[str],
    attempts: dict[str, int] | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """Assign a bucket to each row still to do; count what is skipped and why (a clip that
    already failed `max_attempts` times is not tried again)."""
    counts = {
        "already_done": 0,
        "skipped_no_caption": 0,
        "skipped_too_short": 0,
        "skipped_out_of_attempts": 0,
    }
    todo = []
    for row in source.to_pylist():
        if row["clip_id"] in done:
            counts["already_done"] += 1
            continue
        if quarantine.out_of_attempts(attempts or {}, prepare_key(row), cfg.max_attempts):
            counts["skipped_out_of_attempts"] += 1
            continue
        if not row["caption"]:
            counts["skipped_no_caption"] += 1
            continue
        length = int(row["end_frame"]) - int(row["start_frame"])
        if cfg.mode == "image":
            length = 1
            # T2I from clips: the middle frame of the clip.
            middle = (int(row["start_frame"]) + int(row["end_frame"]) - 1) // 2
            row["start_frame"], row["end_frame"] = middle, middle + 1
        height, width = int(row["height"] or 1), int(row["width"] or 1)
        bucket = choose_bucket(height, width, length, cfg.frame_stride, cfg.buckets)
        if bucket is None:
            counts["skipped_too_short"] += 1
            continue
        todo.append(
            {
                "clip_id": row["clip_id"],
                "video_id": row.get("video_id"),
                "uri": row["uri"],
                "start_frame": int(row["start_frame"]),
                "end_frame": int(row["end_frame"]),
                "caption": str(row["caption"]),
                "source": "image" if cfg.image_source == "dir" and cfg.mode == "image" else "video",
                "num_frames": bucket.num_frames,
                "height": bucket.height,
                "width": bucket.width,
            }
        )
    return todo, counts


def group_tasks(todo: list[dict[str, Any]], clips_per_task: int) -> list[dict[str, Any]]:
    """One task item per (video, up to `clips_per_task` clips): a video is decoded once per
    task, and a long film is split over several tasks so it cannot stall one worker."""
    by_uri: dict[str, list[dict[str, Any]]] = {}
    for clip in todo:
        by_uri.setdefault(clip["uri"], []).append(clip)
    items = []
    for uri, clips in by_uri.items():
        clips.sort(key=lambda c: c["start_frame"])
        for start in range(0, len(clips), clips_per_task):
            chunk = clips[start : start + clips_per_task]
            items.append(
                {
                    "uri": uri,
                    "video_id": chunk[0]["video_id"],
                    "source": chunk[0]["source"],
                    "clips": chunk,
                }
            )
    return items


def _write_meta(db: Database, cfg: PrepareConfig) -> None:
    """Record the encoders and the encoded empty prompt (the null text for text dropout)."""
    from training.encoders import TextEncoder, build_latent_encoder

    text = TextEncoder(cfg.encoder.text_path, "encoder.text_path", cfg.encoder.text_max_length)
    latent = build_latent_encoder(cfg.encoder.kind, cfg.encoder.vae_path, cfg.encoder.pixel_patch)
    empty = text.encode([""])
    row = {
        "latent_encoder": latent.name,
        "encoder_kind": cfg.encoder.kind,
        "pixel_patch": cfg.encoder.pixel_patch,
        "vae_path": cfg.encoder.vae_path,
        "text_path": cfg.encoder.text_path,
        "latent_channels": latent.latent_channels,
        "downsample": latent.downsample,
        "text_encoder": text.name,
        "text_dim": text.dim,
        "text_len": text.max_length,
        "frame_stride": cfg.frame_stride,
        "micro_cond_names": ",".join(MICRO_COND_NAMES),
        "storage_dtype": cfg.storage_dtype,
        **empty_prompt_fields(empty.tokens[0], empty.mask[0], empty.pooled[0]),
    }
    name = meta_table_name(cfg.latents_table)
    if db.has_table(name):
        old = db.table(name).to_table().to_pylist()[0]
        for key in ("latent_encoder", "text_encoder", "latent_channels", "text_dim", "text_len"):
            if old[key] != row[key]:
                raise ConfigError(
                    f"latents_table: {cfg.latents_table!r} was prepared with {key}={old[key]!r}, "
                    f"this config gives {row[key]!r}; use a new latents_table"
                )
    db.write(name, pa.Table.from_pylist([row]), mode="overwrite")


def decode_concurrency(cfg: PrepareConfig, resources: dict[str, float]) -> int:
    """Decode tasks at once: `decode_concurrency`, or every CPU the cluster has left after the
    two encoder pools (at least one), so decoding grows with the cluster as curation does."""
    if cfg.decode_concurrency:
        return cfg.decode_concurrency
    encoder_cpus = 2 * cfg.num_encoder_actors * cfg.encoder_num_cpus
    spare = float(resources.get("CPU", 1)) - encoder_cpus
    return max(1, int(spare // cfg.decode_num_cpus + 1e-9))


def run_prepare(
    db_uri: str,
    snapshot: str | None,
    config_path: str | Path | None,
    overrides: list[str] | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Prepare the latents table for one stage; returns a summary (counts, seconds, buckets)."""
    import lance_ray
    import ray

    start_s = time.time()
    extra = [*(overrides or []), *([f"snapshot={snapshot}"] if snapshot else [])]
    cfg = load_prepare_config(config_path, extra)
    db = Database(db_uri)
    source = _source_rows(db, cfg)
    done: set[str] = set()
    if db.has_table(cfg.latents_table):
        done = set(db.table(cfg.latents_table).to_table(columns=["clip_id"])["clip_id"].to_pylist())
    attempts = quarantine.load_attempts(db)
    todo, counts = _plan(source, cfg, done, attempts)
    _write_meta(db, cfg)
    run_dir = Path(db.uri) / "_prepare" / cfg.latents_table if is_local(db.uri) else None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "resolved_config.yaml")

    written, failures = 0, []
    if todo:
        started = connect_ray(address)
        try:
            encoder = {k: getattr(cfg.encoder, k) for k in EncoderConfig.__dataclass_fields__}
            items = group_tasks(todo, cfg.clips_per_task)
            failure_log = ray.remote(num_cpus=0)(FailureLog).remote()
            ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
            # Plain tasks, as many at once as the cluster's CPUs allow (decode_concurrency).
            ds = ds.flat_map(
                decode_item,
                fn_kwargs={
                    "storage_options": db.storage_options,
                    "stride": cfg.frame_stride,
                    "timeout_s": cfg.decode_timeout_s,
                    "failure_log": failure_log,
                },
                num_cpus=cfg.decode_num_cpus,
                concurrency=min(len(items), decode_concurrency(cfg, ray.cluster_resources())),
            )
            ds = ds.map_batches(
                LatentEncodeActor,
                fn_constructor_kwargs={"encoder": encoder, "storage_dtype": cfg.storage_dtype},
                batch_size=cfg.encode_batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(
                    size=cfg.num_encoder_actors
                ),  # pre-sized (docs/design-notes.md "Bounded tasks and pre-sized pools")
                num_cpus=cfg.encoder_num_cpus,
                num_gpus=1 if cfg.encoder.device == "cuda" else 0,
            )
            ds = ds.map_batches(
                TextEncodeActor,
                fn_constructor_kwargs={"encoder": encoder, "storage_dtype": cfg.storage_dtype},
                batch_size=cfg.encode_batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=cfg.num_encoder_actors),
                num_cpus=cfg.encoder_num_cpus,
                num_gpus=1 if cfg.encoder.device == "cuda" else 0,
            )
            before = (
                db.table(cfg.latents_table).count_rows() if db.has_table(cfg.latents_table) else 0
            )
            mode = "append" if db.has_table(cfg.latents_table) else "create"
            lance_ray.write_lance(
                ds,
                db.uri_for(cfg.latents_table),
                schema=LATENTS_SCHEMA,
                mode=mode,
                storage_options=db.storage_options,
            )
            if db.has_table(cfg.latents_table):
                written = db.table(cfg.latents_table).count_rows() - before
            failures = ray.get(failure_log.take.remote())
        finally:
            if started:
                ray.shutdown()

    # One upsert from the driver: attempts counted per key, earlier rows replaced.
    quarantine.record(
        db,
        [
            quarantine.Failure(f["uri"], f["video_id"], f["clip_id"], "prepare",
                               f["error_type"], f["message"])
            for f in failures
        ],
        attempts,
    )  # fmt: skip
    failed = {f["clip_id"] for f in failures}
    recovered = [prepare_key(c) for c in todo if c["clip_id"] not in failed]
    quarantine.clear(db, [k for k in recovered if k in attempts])

    buckets: dict[str, int] = {}
    if db.has_table(cfg.latents_table):
        for key in db.table(cfg.latents_table).to_table(columns=["bucket"])["bucket"].to_pylist():
            buckets[key] = buckets.get(key, 0) + 1
    return {
        "latents_table": cfg.latents_table,
        "source_rows": source.num_rows,
        "written": written,
        "quarantined": len(failed),
        **counts,
        "buckets": buckets,
        "seconds": round(time.time() - start_s, 2),
    }
