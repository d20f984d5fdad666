"""The Ray Data stages of `stiv prepare` and the plain functions they rest on: a clip's bucket,
its frame window at the stage's stride, the crop to the bucket's shape, the decode of every
window in one pass, and the three stages (decode + crop tasks, then the latent and text encoder
actor pools) that turn a task item into rows of the latents table (`training.latents`).
Decode failures go to one `FailureLog` actor; the driver (`training.prepare`) writes them."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from data_engine.schema import conform
from training.latents import (
    LATENTS_SCHEMA,
    mask_bytes,
    to_storage,
)
from training.prepare_config import BucketConfig, EncoderConfig

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


def decode_item(item: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
    """One decode task (Ray Data flat_map): `DecodeCrop(**kwargs)(item)`."""
    return DecodeCrop(**kwargs)(item)
