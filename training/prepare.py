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

import hashlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from data_engine import quarantine
from data_engine.schema import conform
from data_engine.store import Database
from model.config import MICRO_COND_NAMES
from stiv_core.config import ConfigError, load_config, save_config
from stiv_core.ray_connect import connect_ray
from stiv_core.uris import is_local
from training.latents import (
    LATENTS_SCHEMA,
    empty_prompt_fields,
    mask_bytes,
    meta_table_name,
    to_storage,
)
from training.paths import resolve_path_fields

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Every path field of PrepareConfig (dotted), made absolute on the driver (training/paths.py):
# decode tasks and encoder actors run in their own directories, and the encoder paths are
# recorded in the meta table, so a run can be sampled from any working directory.
PREPARE_PATH_FIELDS = ("image_dir", "encoder.vae_path", "encoder.text_path")

# --------------------------------------------------------------------------- config


@dataclass
class BucketConfig:
    """One training shape; every sample of a bucket has exactly this shape."""

    num_frames: int = 8  # pixel frames per sample (1 = an image bucket for T2I)
    height: int = 32  # pixels
    width: int = 32  # pixels

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError("num_frames: must be >= 1")
        if self.height < 8 or self.width < 8:
            raise ValueError("height/width: must be >= 8 pixels")

    @property
    def key(self) -> str:
        return f"f{self.num_frames}x{self.height}x{self.width}"


@dataclass
class EncoderConfig:
    """The frozen encoders (local directories only: no model hub here)."""

    kind: Literal["pixel", "vae"] = "pixel"  # latent encoder: space-to-depth or AutoencoderKL
    pixel_patch: int = 2  # space-to-depth block size in pixels (kind=pixel)
    vae_path: str = ""  # local AutoencoderKL directory (kind=vae), e.g. sd-vae-ft-ema
    text_path: str = ""  # local CLIP text model + tokenizer directory
    text_max_length: int = 77  # tokens per caption (padded/truncated)
    device: Literal["cpu", "cuda"] = "cpu"  # where the encoders run

    def __post_init__(self) -> None:
        if self.pixel_patch < 1:
            raise ValueError("encoder.pixel_patch: must be >= 1")
        if self.text_max_length < 2:
            raise ValueError("encoder.text_max_length: must be >= 2 (BOS + EOS)")
        if self.kind == "vae" and not self.vae_path:
            raise ValueError("encoder.vae_path: required when encoder.kind is 'vae'")
        if not self.text_path:
            raise ValueError("encoder.text_path: a local CLIP text encoder directory is required")


@dataclass
class PrepareConfig:
    """One training stage's data: which frames, at which shapes, through which encoders."""

    snapshot: str = ""  # snapshot of the clips table to prepare (--snapshot overrides)
    latents_table: str = "latents"  # output table in the same database
    mode: Literal["video", "image"] = "video"  # video samples, or single frames for T2I
    image_source: Literal["clips", "dir"] = (
        "clips"  # image mode: middle frame of each clip, or a directory
    )
    image_dir: str = ""  # image mode with image_source=dir: images + same-stem .txt captions
    frame_stride: int = 3  # keep one source frame of every `frame_stride` (paper: 3)
    buckets: list[BucketConfig] = field(default_factory=lambda: [BucketConfig()])
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    caption_column: str = "caption"  # clips column holding the caption
    storage_dtype: Literal["float32", "float16"] = "float32"  # latents/text bytes on disk
    encode_batch_size: int = 8  # samples per encoder call
    num_encoder_actors: int = 1  # actors per encoder pool (pre-sized: min == max)
    encoder_num_cpus: float = 1.0  # CPUs reserved per encoder actor
    decode_num_cpus: float = 1.0  # CPUs reserved per decode task
    # Decode tasks running at once (0 = as many as the cluster's CPUs allow after the encoder
    # actors, from ray.cluster_resources() at the start, so decoding scales with the cluster).
    decode_concurrency: int = 0
    max_attempts: int = 3  # tries per clip before prepare stops retrying a quarantined clip
    # clips of one video decoded together (bounded: docs/design-notes.md "Bounded tasks and
    # pre-sized pools")
    clips_per_task: int = 16
    decode_timeout_s: float = 600.0  # time budget for decoding one task's video

    def __post_init__(self) -> None:
        if self.frame_stride < 1:
            raise ValueError("frame_stride: must be >= 1")
        if not self.latents_table or not self.latents_table.replace("_", "").isalnum():
            raise ValueError("latents_table: use letters, digits and '_'")
        if not self.buckets:
            raise ValueError("buckets: at least one bucket is required")
        for bucket in self.buckets:
            if self.mode == "image" and bucket.num_frames != 1:
                raise ValueError("buckets: image mode needs num_frames == 1 in every bucket")
            if self.mode == "video" and bucket.num_frames < 2:
                raise ValueError("buckets: video mode needs num_frames >= 2 in every bucket")
        if len({b.key for b in self.buckets}) != len(self.buckets):
            raise ValueError("buckets: duplicate bucket shapes")
        if self.mode == "image" and self.image_source == "dir" and not self.image_dir:
            raise ValueError("image_dir: required when image_source is 'dir'")
        if self.encode_batch_size < 1:
            raise ValueError("encode_batch_size: must be >= 1")
        if self.num_encoder_actors < 1:
            raise ValueError("num_encoder_actors: must be >= 1")
        if self.encoder_num_cpus <= 0 or self.decode_num_cpus <= 0:
            raise ValueError("encoder_num_cpus/decode_num_cpus: must be > 0")
        if self.decode_concurrency < 0:
            raise ValueError("decode_concurrency: must be >= 0 (0 = derived from the cluster)")
        if self.max_attempts < 1:
            raise ValueError("max_attempts: must be >= 1")
        if self.clips_per_task < 1 or self.decode_timeout_s <= 0:
            raise ValueError("clips_per_task/decode_timeout_s: must be >= 1 / > 0")


# --------------------------------------------------------------------------- plain functions


def choose_bucket(
    height: int, width: int, num_source_frames: int, stride: int, buckets: list[BucketConfig]
) -> BucketConfig | None:
    """The bucket whose aspect ratio is closest to the clip's, among those the clip is long
    enough for; ties go to more frames, then more pixels. None when no bucket fits."""
    fitting = [b for b in buckets if (b.num_frames - 1) * stride + 1 <= num_source_frames]
    if not fitting:
        return None
    aspect = math.log(width / height)
    return min(
        fitting,
        key=lambda b: (
            round(abs(math.log(b.width / b.height) - aspect), 6),
            -b.num_frames,
            -b.height * b.width,
        ),
    )


def window_frames(start_frame: int, end_frame: int, num_frames: int, stride: int) -> list[int]:
    """Source frame indices of the sample: `num_frames` at `stride`, centred in the clip."""
    span = (num_frames - 1) * stride + 1
    first = start_frame + (end_frame - start_frame - span) // 2
    return [first + i * stride for i in range(num_frames)]


def crop_box(height: int, width: int, bucket_height: int, bucket_width: int) -> tuple[int, ...]:
    """Centred crop (top, left, crop_height, crop_width) in original pixels with the bucket's
    aspect ratio, as large as the frame allows; resizing it gives the bucket's shape."""
    scale = max(bucket_height / height, bucket_width / width)
    crop_h = min(height, max(1, round(bucket_height / scale)))
    crop_w = min(width, max(1, round(bucket_width / scale)))
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def crop_and_resize(frames: np.ndarray, bucket: BucketConfig) -> tuple[np.ndarray, list[float]]:
    """(K, H, W, 3) uint8 -> ((K, bh, bw, 3) uint8, micro-conditions without the stride)."""
    import cv2

    _, height, width, _ = frames.shape
    top, left, crop_h, crop_w = crop_box(height, width, bucket.height, bucket.width)
    out = np.empty((frames.shape[0], bucket.height, bucket.width, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        region = frame[top : top + crop_h, left : left + crop_w]
        # INTER_AREA when shrinking avoids aliasing; cubic when growing.
        interp = cv2.INTER_AREA if crop_h >= bucket.height else cv2.INTER_CUBIC
        out[i] = cv2.resize(region, (bucket.width, bucket.height), interpolation=interp)
    return out, [float(height), float(width), float(top), float(left), float(crop_h), float(crop_w)]


def decode_windows(
    uri: str,
    windows: list[list[int]],
    storage_options: dict[str, str] | None = None,
    timeout_s: float = 600.0,
) -> Iterator[tuple[int, np.ndarray]]:
    """(window index, (K, H, W, 3) uint8 RGB frames) for frame-index windows of one video, in
    one sequential decoding pass, each yielded as soon as its last frame is decoded.

    A window may name a frame more than once; its frames come back in the window's order.
    Decoding is the data engine's window decoder (`data_engine.video.decode_windows`): frames
    counted by decoding order exactly as the split stage counts them, rotated for display like
    the clips table's width and height, local paths and object stores, FFmpeg errors mapped to
    VideoError, a truncated file named as such."""
    from data_engine import video

    def rotated_rgb(frame, index, stream) -> np.ndarray:
        return video.apply_rotation(
            frame.to_ndarray(format="rgb24"), video.rotation_from_frame(frame)
        )

    deadline = time.monotonic() + timeout_s
    for w, frames in video.decode_windows(
        uri, windows, rotated_rgb, "prepare", storage_options, timeout_s, deadline
    ):
        yield w, np.stack([frames[i] for i in windows[w]])


def stable_id(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- Ray stages


class FailureLog:
    """Collects decode failures from every task (one Ray actor per prepare run); the driver
    takes them at the end and upserts them into the quarantine table in one commit."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)

    def take(self) -> list[dict[str, Any]]:
        rows, self.rows = self.rows, []
        return rows


class DecodeCrop:
    """Reads one task item (a video, or an image, and its clips' windows and buckets); writes one
    row per clip: frames cropped to the bucket (bytes) + micro_cond. Each video is decoded once
    per task. A clip that cannot be decoded is sent to the failure log (a quarantine row, written
    by the driver) instead of failing the job.
    """

    def __init__(
        self,
        storage_options: dict[str, str] | None,
        stride: int,
        timeout_s: float,
        failure_log: Any = None,
    ) -> None:
        self.storage_options = storage_options
        self.stride = stride
        self.timeout_s = timeout_s
        self.failure_log = failure_log  # FailureLog actor handle (None: raise instead)

    def _quarantine(
        self, item: dict[str, Any], clips: list[dict[str, Any]], err: Exception
    ) -> None:
        import ray

        if self.failure_log is None:
            raise err
        rows = [
            {
                "uri": item["uri"],
                "video_id": item.get("video_id") or clip["clip_id"],
                "clip_id": clip["clip_id"],
                "error_type": getattr(err, "error_type", type(err).__name__),
                "message": str(err),
            }
            for clip in clips
        ]
        ray.get(self.failure_log.add.remote(rows))  # recorded before the task reports done

    def _row(self, clip: dict[str, Any], frames: np.ndarray) -> dict[str, Any]:
        bucket = BucketConfig(int(clip["num_frames"]), int(clip["height"]), int(clip["width"]))
        cropped, micro = crop_and_resize(frames, bucket)
        # Frame stride is a micro-condition of videos; images have none (0).
        stride = float(self.stride if bucket.num_frames > 1 else 0)
        return {
            "clip_id": clip["clip_id"],
            "caption": clip["caption"],
            "bucket": bucket.key,
            "num_frames": bucket.num_frames,
            "height": bucket.height,
            "width": bucket.width,
            "frames": cropped.tobytes(),
            "micro_cond": [*micro, stride],
        }

    def __call__(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        from data_engine.video import VideoError

        clips = item["clips"]
        out: list[dict[str, Any]] = []
        try:
            if item["source"] == "image":
                import cv2

                image = cv2.imread(item["uri"], cv2.IMREAD_COLOR)
                if image is None:
                    raise VideoError(
                        "prepare", "unreadable_image", f"cannot read image {item['uri']}"
                    )
                return [self._row(clips[0], np.ascontiguousarray(image[None, :, :, ::-1]))]
            windows = [
                window_frames(c["start_frame"], c["end_frame"], c["num_frames"], self.stride)
                for c in clips
            ]
            for w, frames in decode_windows(
                item["uri"], windows, self.storage_options, self.timeout_s
            ):
                out.append(self._row(clips[w], frames))
        except (VideoError, ValueError, OSError) as err:
            done = {row["clip_id"] for row in out}
            self._quarantine(item, [c for c in clips if c["clip_id"] not in done], err)
        return out


class LatentEncodeActor:
    """Reads `frames`; writes `latents` + `latent_shape` (the frozen encoder loads once)."""

    def __init__(self, encoder: dict[str, Any], storage_dtype: str) -> None:
        from training.encoders import build_latent_encoder

        cfg = EncoderConfig(**encoder)
        self.encoder = build_latent_encoder(cfg.kind, cfg.vae_path, cfg.pixel_patch, cfg.device)
        self.storage_dtype = storage_dtype

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        latents, shapes = [None] * len(rows), [None] * len(rows)
        # Encode samples of one bucket together (equal shapes stack).
        by_bucket: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            by_bucket.setdefault(row["bucket"], []).append(i)
        for indices in by_bucket.values():
            first = rows[indices[0]]
            shape = (first["num_frames"], first["height"], first["width"], 3)
            frames = np.stack(
                [np.frombuffer(rows[i]["frames"], np.uint8).reshape(shape) for i in indices]
            )
            z = self.encoder.encode(frames).numpy()  # (n, C, T, h, w)
            for j, i in enumerate(indices):
                latents[i] = to_storage(z[j], self.storage_dtype)
                shapes[i] = list(z.shape[1:])
        out = batch.drop_columns(["frames"])
        out = out.append_column("latents", pa.array(latents, pa.binary()))
        return out.append_column("latent_shape", pa.array(shapes, pa.list_(pa.int32())))


class TextEncodeActor:
    """Reads `caption`; writes text tokens, mask and pooled EOS embedding (loads once)."""

    def __init__(self, encoder: dict[str, Any], storage_dtype: str) -> None:
        from training.encoders import TextEncoder

        cfg = EncoderConfig(**encoder)
        self.encoder = TextEncoder(
            cfg.text_path, "encoder.text_path", cfg.text_max_length, device=cfg.device
        )
        self.storage_dtype = storage_dtype

    def __call__(self, batch: pa.Table) -> pa.Table:
        emb = self.encoder.encode([str(c) for c in batch.column("caption").to_pylist()])
        n, length, dim = emb.tokens.shape
        columns = {name: batch.column(name) for name in batch.column_names}
        columns["text_tokens"] = pa.array(
            [to_storage(emb.tokens[i], self.storage_dtype) for i in range(n)], pa.binary()
        )
        columns["text_shape"] = pa.array([[length, dim]] * n, pa.list_(pa.int32()))
        columns["text_mask"] = pa.array([mask_bytes(emb.mask[i]) for i in range(n)], pa.binary())
        columns["text_pooled"] = pa.array(
            [to_storage(emb.pooled[i], self.storage_dtype) for i in range(n)], pa.binary()
        )
        return conform(pa.table(columns), LATENTS_SCHEMA)


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


def load_prepare_config(
    config_path: str | Path | None, overrides: list[str] | None = None
) -> PrepareConfig:
    """The prepare config with every path field absolute (the one place they are resolved)."""
    cfg = load_config(PrepareConfig, config_path, overrides)
    resolve_path_fields(cfg, PREPARE_PATH_FIELDS)
    return cfg


def decode_item(item: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
    """One decode task (Ray Data flat_map): `DecodeCrop(**kwargs)(item)`."""
    return DecodeCrop(**kwargs)(item)


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
