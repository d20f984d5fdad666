"""What the driver fixes before any worker starts: the run it resumes, the model shape, the
buckets and their per-rank batch sizes, the workers, and the typed `WorkerPlan` each rank is
handed (through Ray Train's `train_loop_config`, as plain values)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.info import tokens_per_sample
from stiv_core.config import ConfigError, load_config
from training.config import RESUME_MODES, DataSection, ObjectiveSection, ScalingSection, TrainConfig


@dataclass(frozen=True)
class WorkerPlan:
    """Everything one rank needs, resolved on the driver so every rank agrees."""

    config: dict[str, Any]  # the resolved TrainConfig (stiv_core.config.to_dict)
    model_config: dict[str, Any]  # model.config.STIVConfig.to_dict()
    meta: dict[str, Any]  # the latents table's meta row (encoders, empty prompt)
    latents_uri: str  # the latents table's URI
    storage_options: dict[str, str] | None  # object-store credentials and endpoint
    table_version: int  # the latents table version a fresh run reads
    resume_path: str  # checkpoint a new `stiv train` of an existing run continues from ("" = none)
    micro_batch: int  # the largest per-rank bucket batch (what DeepSpeed books)
    num_workers: int  # ranks
    cpus_per_worker: float  # CPUs Ray grants each rank (its torch threads, rounded up)
    use_gpu: bool  # one GPU per rank

    def train_config(self) -> TrainConfig:
        return load_config(TrainConfig, base=self.config)

    def stiv_config(self):
        from model.config import STIVConfig

        return STIVConfig.from_dict(self.model_config)

    def to_loop_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_loop_config(cls, loop_config: dict[str, Any]) -> WorkerPlan:
        return cls(**loop_config)


def resume_checkpoint(
    run_dir: Path,
    resume: str,
    num_workers: int,
    seed: int,
    batch_sizes: dict[str, int] | None = None,
) -> tuple[int, Path] | None:
    """(step, path) of the checkpoint this run continues from, or None for a fresh run.

    `resume="auto"` continues when a checkpoint exists and starts fresh otherwise (what a
    retried cluster job needs); `"require"` insists on one. The data position (which rows each
    rank reads at each step) and the per-rank optimizer shards depend on the number of ranks and
    the seed and the per-bucket batch sizes, so a checkpoint written under other values is
    refused with one line."""
    from training.checkpoint import TRAIN_STATE_FILE, list_checkpoints

    if resume not in RESUME_MODES:
        raise ConfigError(f"--resume: must be one of {list(RESUME_MODES)}, got {resume!r}")
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        if resume == "require":
            raise ConfigError(f"--resume=require: no checkpoint in {run_dir}")
        return None
    step, path = checkpoints[-1]
    state = json.loads((path / TRAIN_STATE_FILE).read_text())
    differs = []
    if "world_size" in state and int(state["world_size"]) != num_workers:
        differs.append(f"{state['world_size']} ranks, this run has {num_workers}")
    if "seed" in state and int(state["seed"]) != seed:
        differs.append(f"seed {state['seed']}, this run has {seed}")
    if batch_sizes is not None and state.get("batch_sizes", batch_sizes) != batch_sizes:
        differs.append(f"batch sizes {state['batch_sizes']}, this run has {batch_sizes}")
    if differs:
        raise ConfigError(
            f"resume: the checkpoint at step {step} in {run_dir} was written with "
            f"{'; '.join(differs)} (set scaling.num_workers/seed to match, or use a new run_dir)"
        )
    return step, path


def resolve_model_config(cfg: TrainConfig, meta: dict[str, Any]):
    """Preset + overrides, with the encoder dims from the latents table and, when growing from
    a parent run, the parent's RoPE base sizes (positions interpolate: docs/recipe.md
    "RoPE and its interpolation")."""
    from model.config import get_preset
    from model.init import inherit_rope_base
    from training.checkpoint import load_ema_state

    derived = {
        "in_channels": int(meta["latent_channels"]),
        "text_dim": int(meta["text_dim"]),
        "max_text_tokens": int(meta["text_len"]),
    }
    for key, value in derived.items():
        given = cfg.model.overrides.get(key)
        if given is not None and int(given) != value:
            raise ValueError(f"model.overrides.{key}: {given} but the latents table has {value}")
    model_cfg = get_preset(cfg.model.preset, **{**cfg.model.overrides, **derived})
    if cfg.init_from.mode != "none" and cfg.init_from.inherit_rope:
        _, parent = load_ema_state(cfg.init_from.run_dir)
        model_cfg = inherit_rope_base(model_cfg, parent)
    return model_cfg


def bucket_shape(key: str) -> tuple[int, int, int]:
    """(num_frames, height, width) in pixels of a bucket key `f{frames}x{height}x{width}`."""
    frames, height, width = (int(v) for v in key[1:].split("x"))
    return frames, height, width


def select_buckets(data: DataSection, keys: list[str]) -> list[str]:
    """The table's buckets this stage trains on (`data.buckets`; all when empty)."""
    if not data.buckets:
        return keys
    missing = sorted(set(data.buckets) - set(keys))
    if missing:
        raise ConfigError(f"data.buckets: {missing} not in the latents table (it has {keys})")
    return [k for k in keys if k in data.buckets]


def latent_bucket_key(latent_shape, downsample: int) -> str:
    """The bucket key of a batch of latents (B, C, T, h, w): the per-frame encoders keep the
    frame count and shrink space by `downsample`."""
    _, _, frames, h, w = (int(v) for v in latent_shape)
    return f"f{frames}x{h * downsample}x{w * downsample}"


def check_tasks_fit(objective: ObjectiveSection, keys: list[str]) -> None:
    """Before any worker starts: every bucket of the table has a task whose window fits it
    (a 20-frame clip cannot give keyframes at stride 20), named in the error."""
    from training.tasks import tasks_for_bucket

    if not objective.tasks:
        return
    for key in keys:
        frames = bucket_shape(key)[0]
        if not tasks_for_bucket(objective.tasks, key, frames, objective.num_frames):
            spans = {t.name: t.span(objective.num_frames or frames) for t in objective.tasks}
            raise ConfigError(
                f"objective.tasks: no task fits bucket {key} ({frames} prepared frames; frames "
                f"each task's window spans: {spans}); prepare longer clips (frame_stride 1) or "
                "lower a task's frame_stride"
            )


def bucket_tokens(model_cfg, key: str, downsample: int) -> int:
    """Patch tokens per sample of a bucket: latent frames over the temporal patch (one frame is
    an image: one temporal token) times latent cells over the spatial patch. The latent
    encoders work per frame, so a bucket's latent frames equal its pixel frames."""
    frames, height, width = bucket_shape(key)
    latent = [model_cfg.in_channels, frames, height // downsample, width // downsample]
    return tokens_per_sample(model_cfg, latent)


def bucket_batch_sizes(
    data: DataSection, keys: list[str], model_cfg, downsample: int
) -> dict[str, int]:
    """Per-rank batch size of each bucket: `bucket_batch_size` where given, else as many
    samples as fit `max_tokens_per_rank`, else `batch_size`."""
    sizes = {}
    for key in keys:
        if key in data.bucket_batch_size:
            sizes[key] = data.bucket_batch_size[key]
        elif data.max_tokens_per_rank:
            tokens = bucket_tokens(model_cfg, key, downsample)
            if tokens > data.max_tokens_per_rank:
                raise ConfigError(
                    f"data.max_tokens_per_rank: {data.max_tokens_per_rank} is below one sample of "
                    f"bucket {key} ({tokens} tokens)"
                )
            sizes[key] = data.max_tokens_per_rank // tokens
        else:
            sizes[key] = data.batch_size
    return sizes


def resolve_scaling(scaling: ScalingSection, resources: dict[str, float]) -> dict[str, Any]:
    """Workers from cluster resources. On CPU the workers share what is left after `data_cpus`,
    so Ray Data tasks can always be scheduled (docs/design-notes.md "The 2-core trap": 2
    workers at 1 CPU each on a 2-core machine deadlock)."""
    cpus, gpus = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    use_gpu = scaling.device == "gpu" or (scaling.device == "auto" and gpus >= 1)
    if scaling.device == "gpu" and gpus < 1:
        raise ValueError("scaling.device: 'gpu' but the cluster has no GPUs")
    spare = cpus - scaling.data_cpus
    if use_gpu:
        workers = scaling.num_workers or int(gpus)
    else:
        workers = scaling.num_workers or max(1, int(spare))
    per_worker = scaling.cpus_per_worker or spare / workers
    if per_worker <= 0 or per_worker * workers > cpus + 1e-9:
        raise ConfigError(
            f"scaling: {workers} workers x {per_worker:.2f} CPUs do not fit {cpus:.0f} CPUs "
            f"with {scaling.data_cpus} kept for data"
        )
    return {"num_workers": workers, "cpus_per_worker": per_worker, "use_gpu": use_gpu}
