"""`stiv prepare --config`: the buckets, the encoders and the run's knobs, checked on load
(the error names the field) before Ray starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from stiv_core.config import load_config
from training.paths import resolve_path_fields

# Every path field of PrepareConfig (dotted), made absolute on the driver (training/paths.py):
# decode tasks and encoder actors run in their own directories, and the encoder paths are
# recorded in the meta table, so a run can be sampled from any working directory.
PREPARE_PATH_FIELDS = ("image_dir", "encoder.vae_path", "encoder.text_path")


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


def load_prepare_config(
    config_path: str | Path | None, overrides: list[str] | None = None
) -> PrepareConfig:
    """The prepare config with every path field absolute (the one place they are resolved)."""
    cfg = load_config(PrepareConfig, config_path, overrides)
    resolve_path_fields(cfg, PREPARE_PATH_FIELDS)
    return cfg
