"""`stiv train`: one stage of the progressive recipe with Ray Train + DeepSpeed ZeRO.

The driver (`run_train`) resolves the config, the model shape (from the preset, the latents
table's encoders and the parent run), sizes the workers from the cluster's resources, and starts
a `TorchTrainer`. Each worker (`train_worker`) builds the model, initialises it from the parent
run's EMA weights (`init_from`), wraps it in DeepSpeed, and steps through its deterministic
bucket-per-batch feed (`training.data`), logging and checkpointing through Ray Train.

Numbers (docs/recipe.md "Training"): AdaFactor beta1 0.9 / beta2 0.999 without weight decay,
gradient clipping 1.0, constant LR 2e-4 after 1k linear warm-up steps, fp32 EMA 0.9999.
Precision: fp32 on the CPU (gloo; fp16 is unavailable there), bf16 autocast over fp32 weights on
GPUs, so the fp32 master weights are the parameters themselves and are what checkpoints hold
(docs/design-notes.md "Checkpoints": rebuilding masters from bf16 caused loss surges).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stiv_core.config import ConfigError, load_config, save_config, to_dict
from stiv_core.uris import is_local, local_path
from training.paths import resolve_path_fields
from training.tasks import TaskSection, check_tasks
from training.validation import EvalSection

INIT_MODES = ("none", "plain", "t2v_from_t2i", "both")
RESUME_MODES = ("auto", "require")  # auto: resume when a checkpoint exists; require: insist
# Every path field of TrainConfig (dotted), made absolute on the driver (training/paths.py).
TRAIN_PATH_FIELDS = (
    "db",
    "run_dir",
    "init_from.run_dir",
    "init_from.temporal_run_dir",
    "eval.image",
)


# --------------------------------------------------------------------------- config


@dataclass
class ModelSection:
    """The network: a preset plus overrides of STIVConfig fields."""

    preset: str = "stiv-tiny-cpu"  # model.config preset name
    overrides: dict[str, Any] = field(default_factory=dict)  # STIVConfig fields, e.g. mask_ratio

    def __post_init__(self) -> None:
        from model.config import get_preset

        try:
            get_preset(self.preset, **self.overrides)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"model: {err}") from None


@dataclass
class InitFromSection:
    """Where this stage's weights start (docs/recipe.md "Progressive recipe")."""

    run_dir: str = ""  # parent run whose latest EMA weights start this one ("" = from scratch)
    mode: Literal["none", "plain", "t2v_from_t2i", "both"] = "none"  # plain: same shapes;
    # t2v_from_t2i: all but temporal attention, patch embedding inflated; both: all but temporal
    # attention from run_dir, temporal attention from temporal_run_dir
    temporal_run_dir: str = ""  # mode=both: the (low-resolution) T2V run giving temporal attention
    inherit_rope: bool = True  # keep the parent's RoPE base sizes (interpolate when growing)

    def __post_init__(self) -> None:
        if self.mode == "none" and self.run_dir:
            raise ValueError(
                "init_from.mode: give a mode (plain | t2v_from_t2i | both) with run_dir"
            )
        if self.mode != "none" and not self.run_dir:
            raise ValueError(f"init_from.run_dir: required for mode {self.mode!r}")
        if self.mode == "both" and not self.temporal_run_dir:
            raise ValueError("init_from.temporal_run_dir: required for mode 'both'")


@dataclass
class OptimizerSection:
    """Optimizer and schedule (docs/recipe.md "Training")."""

    name: Literal["adafactor", "adamw"] = "adafactor"  # see training/optim.py for the variant
    lr: float = 2e-4  # peak learning rate
    warmup_steps: int = 1000  # linear warm-up, then constant
    beta1: float = 0.9  # first-moment decay
    beta2: float = 0.999  # second-moment decay (constant)
    weight_decay: float = 0.0  # the paper uses none
    grad_clip: float = 1.0  # global gradient-norm clip
    factored: bool = True  # AdaFactor: factor the second moment of >= 2-D tensors

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError("optimizer.lr: must be > 0")
        if self.warmup_steps < 0:
            raise ValueError("optimizer.warmup_steps: must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError("optimizer.beta1/beta2: must be in [0, 1)")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("optimizer.grad_clip/weight_decay: must be >= 0")


@dataclass
class ObjectiveSection:
    """Flow matching and conditioning (docs/recipe.md "Flow matching")."""

    timestep_sampler: Literal["uniform", "logit_normal"] = "logit_normal"  # t distribution
    text_dropout: float = 0.1  # probability of the encoded empty prompt
    image_dropout: float = 0.08  # probability of dropping the given frames (TI2V -> T2V)
    given_frames: Literal["none", "first", "first_k", "endpoints"] = "none"  # frame replacement:
    # none = T2I/T2V, first = TI2V (STIV), first_k = prediction, endpoints = interpolation
    num_given_frames: int = 1  # latent frames given for first_k
    # Application stages (training/tasks.py, docs/applications.md "Tasks"): each sample draws
    # one of these tasks with its probability (they sum to 1) and trains on a window of
    # `num_frames` latent frames cut at the task's stride. Empty = the one task above on the
    # bucket's frames as prepared (T2I, T2V, TI2V stages).
    tasks: list[TaskSection] = field(default_factory=list)
    num_frames: int = 0  # latent frames per training window with tasks (0 = the bucket's)

    def __post_init__(self) -> None:
        for name in ("text_dropout", "image_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"objective.{name}: must be in [0, 1)")
        if self.num_given_frames < 1:
            raise ValueError("objective.num_given_frames: must be >= 1")
        if self.num_frames < 0:
            raise ValueError("objective.num_frames: must be >= 0 (0 = the bucket's frames)")
        if self.tasks and self.given_frames != "none":
            raise ValueError(
                "objective.given_frames: leave it 'none' when objective.tasks lists the tasks "
                "(each task names its given frames)"
            )
        check_tasks(self.tasks)


@dataclass
class DataSection:
    """Batches (per rank) and the input pipeline."""

    batch_size: int = 8  # samples per rank per step, for every bucket not listed below
    bucket_batch_size: dict[str, int] = field(default_factory=dict)  # bucket key -> per-rank batch
    # Token budget per rank per step (0 = off): each bucket not in bucket_batch_size gets as many
    # samples as fit, so a step costs about the same at every shape (resolution traded against
    # frames, as VideoX-Fun and Open-Sora do). Tokens = latent patches the model sees per sample.
    max_tokens_per_rank: int = 0
    prefetch_steps: int = 16  # steps per read window; the next window is read while one trains
    steps_per_fetch: int = 4  # steps read by one Ray Data read task (training.data.rank_feed)
    fetch_num_cpus: float = 0.25  # CPUs reserved by each batch-fetching task
    table_version: int = 0  # latents table version to read (0 = latest at the first start)
    # Train on these buckets of the table only ([] = all): one latents table holds the shape
    # clips and the multi-view renders, and each application stage names its own.
    buckets: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or any(v < 1 for v in self.bucket_batch_size.values()):
            raise ValueError("data.batch_size: must be >= 1")
        if self.prefetch_steps < 1 or self.fetch_num_cpus <= 0:
            raise ValueError("data.prefetch_steps/fetch_num_cpus: must be >= 1 / > 0")
        if self.steps_per_fetch < 1:
            raise ValueError("data.steps_per_fetch: must be >= 1")
        if self.max_tokens_per_rank < 0:
            raise ValueError("data.max_tokens_per_rank: must be >= 0 (0 = use batch_size)")


@dataclass
class ScalingSection:
    """Workers, sized from the cluster's resources so data tasks keep CPUs
    (docs/design-notes.md "The 2-core trap")."""

    device: Literal["auto", "cpu", "gpu"] = "auto"  # auto: GPUs when the cluster has them
    num_workers: int = 0  # data-parallel ranks (0 = one per GPU, or per spare CPU)
    cpus_per_worker: float = 0.0  # CPUs per rank (0 = split what is left after data_cpus)
    data_cpus: float = 1.0  # CPUs kept free for Ray Data's read/fetch tasks
    zero_stage: int = 2  # DeepSpeed ZeRO stage: 0 (replicated), 1, 2 (optimizer+grad partitions)
    max_failures: int = 2  # worker-group restarts from the latest checkpoint (FailureConfig)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    # how ranks are placed on nodes: STRICT_SPREAD puts one rank per node (Ray placement groups)

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            # ZeRO-3 would partition parameters, so the fp32 EMA could not be updated or saved
            # from rank 0 without gathering every step.
            raise ValueError("scaling.zero_stage: must be 0, 1 or 2")
        if self.num_workers < 0 or self.cpus_per_worker < 0 or self.data_cpus < 0:
            raise ValueError("scaling.num_workers/cpus_per_worker/data_cpus: must be >= 0")


@dataclass
class TrainConfig:
    """One training stage."""

    db: str = ""  # database directory/URI holding the latents table
    latents_table: str = "latents"  # written by `stiv prepare`
    run_dir: str = ""  # where checkpoints, metrics and the resolved config go
    max_steps: int = 1000  # optimizer steps in total (resume continues up to this)
    # Wall-clock budget of this run's step loop in minutes (0 = none): at the first metric line
    # past it every rank stops together and the step is checkpointed, so a CPU demo keeps to a
    # time limit whatever the machine's load. A resume goes on towards max_steps.
    max_minutes: float = 0.0
    seed: int = 0  # data order, noise, dropout
    init_from: InitFromSection = field(default_factory=InitFromSection)
    model: ModelSection = field(default_factory=ModelSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    data: DataSection = field(default_factory=DataSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    eval: EvalSection = field(default_factory=EvalSection)  # validation samples while training
    ema_decay: float = 0.9999  # EMA of weights (fp32)
    ema_warmup: bool = False  # ramp the decay as (1+s)/(10+s) (short CPU runs)
    log_every: int = 10  # steps between metric lines
    checkpoint_every: int = 500  # steps between checkpoints (and at max_steps)
    keep_checkpoints: int = 3  # newest checkpoints kept
    gpu_peak_tflops: float = 989.0  # dense bf16 peak per GPU for the MFU estimate (H100 SXM)
    debug_kill_rank: int = -1  # fault injection for the recovery test: this rank exits...
    debug_kill_at_step: int = -1  # ...once, at this step (-1 = never)

    def __post_init__(self) -> None:
        if not self.db:
            raise ValueError("db: the database holding the latents table is required")
        if not self.run_dir:
            raise ValueError("run_dir: required")
        for name in ("max_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("ema_decay: must be in [0, 1)")
        if self.max_minutes < 0:
            raise ValueError("max_minutes: must be >= 0 (0 = no time limit)")


# --------------------------------------------------------------------------- driver helpers


def load_train_config(
    config_path: str | Path | None, overrides: list[str] | None = None
) -> TrainConfig:
    """The stage config with every path field absolute (the one place paths are resolved:
    workers run in their own directories, so a relative `init_from.temporal_run_dir` would
    point elsewhere there)."""
    cfg = load_config(TrainConfig, config_path, overrides)
    resolve_path_fields(cfg, TRAIN_PATH_FIELDS)
    return cfg


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


def read_latents_meta(db_uri: str, latents_table: str) -> dict[str, Any]:
    """The one-row meta table `stiv prepare` wrote (encoders, empty prompt)."""
    from data_engine.store import Database
    from training.prepare import meta_table_name

    db = Database(db_uri)
    if not db.has_table(latents_table):
        raise FileNotFoundError(
            f"latents_table: {latents_table!r} not found in {db.uri} (run stiv prepare)"
        )
    return db.table(meta_table_name(latents_table)).to_table().to_pylist()[0]


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
    return _tokens_per_sample(model_cfg, latent)


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


def initialise_from(model, init_from: InitFromSection) -> None:
    """Load the weights a stage starts from into `model`, in place (docs/recipe.md
    "Progressive recipe"): the parent's EMA weights as they are (plain), T2I -> T2V inflation
    (all but temporal attention; temporal gates at zero), or the "both" merge. Each worker reads the
    parent run from shared storage, so multi-GB states never travel through Ray's object store.
    """
    from model.init import init_both, init_video_from_image
    from training.checkpoint import load_ema_state

    if init_from.mode == "none":
        return
    parent, _ = load_ema_state(init_from.run_dir)
    if init_from.mode == "plain":
        model.load_state_dict(parent, strict=True)
    elif init_from.mode == "t2v_from_t2i":
        init_video_from_image(model, parent)
    else:
        temporal, _ = load_ema_state(init_from.temporal_run_dir)
        init_both(model, parent, temporal)


def flops_per_sample(model_cfg, latent_shape: list[int], text_len: int) -> float:
    """Training FLOPs for one sample (forward + backward = 3x forward), counted as 2 x MACs of
    every matmul: linear layers (2 x block weights x tokens) plus attention scores and weighted
    sums (spatial 4 N^2 d per frame, temporal 4 T^2 d per position, cross 4 N L d per frame).
    Under MaskDiT the main blocks see only the kept tokens; the extra blocks see all of them.
    Norms, RoPE and the condition MLPs are ignored (well under 1% at XL size)."""
    c, t, h, w = latent_shape
    p, pt, d = model_cfg.patch_size, model_cfg.temporal_patch_size, model_cfg.hidden_size
    tt, n_all = max(1, t // pt), (h // p) * (w // p)
    has_temporal = model_cfg.temporal_attention and tt > 1

    def block(n: int) -> float:
        linear = 2 * (
            4 * d * d
            + (4 * d * d if has_temporal else 0)
            + 2 * d * d
            + 2 * d * model_cfg.mlp_hidden
        )
        kv_text = 2 * 2 * d * d * text_len  # cross-attention keys/values of the text tokens
        attention = (
            4 * n * n * d * tt
            + (4 * tt * tt * d * n if has_temporal else 0)
            + 4 * n * text_len * d * tt
        )
        return linear * n * tt + kv_text + attention

    n_kept = max(1, round(n_all * (1 - model_cfg.mask_ratio)))
    forward = model_cfg.num_masked_blocks * block(n_kept)
    forward += model_cfg.num_extra_unmasked_blocks * block(n_all)
    forward += 2 * 2 * tt * n_all * d * (c * p * p * pt)  # patch embedding + final projection
    return 3.0 * forward


# --------------------------------------------------------------------------- the worker


def _rng_state() -> dict[str, Any]:
    import torch

    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _given_frames(objective: ObjectiveSection, batch: int, frames: int):
    from model.flow import endpoints_mask, first_frames_mask

    if objective.given_frames == "none" or frames < 2:
        return None
    if objective.given_frames == "first":
        return first_frames_mask(batch, frames, 1)
    if objective.given_frames == "first_k":
        return first_frames_mask(batch, frames, min(objective.num_given_frames, frames - 1))
    return endpoints_mask(batch, frames)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """After a restart, drop metric lines past the restored step (they will be recomputed)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln)["step"] <= last_step]
    path.write_text("".join(f"{ln}\n" for ln in kept))


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop: build, initialise/restore, then step, log and checkpoint."""
    import tempfile

    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from model.config import STIVConfig
    from model.flow import training_loss
    from model.network import STIV
    from training.checkpoint import (
        EMA_FILE,
        MODEL_CONFIG_FILE,
        TRAIN_STATE_FILE,
        write_encoders,
    )
    from training.data import index_table, rank_feed
    from training.optim import (
        EMA,
        attach_zero_partitions,
        build_optimizer,
        optimizer_state_bytes,
        warmup_constant,
    )
    from training.tasks import build_task_batch

    cfg = load_config(TrainConfig, base=loop_config["config"])
    model_cfg = STIVConfig.from_dict(loop_config["model_config"])
    meta = loop_config["meta"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = loop_config["use_gpu"]
    # A rank granted 1.5 CPUs uses 2 threads (ceil): its fractional share is real CPU time.
    torch.set_num_threads(max(1, math.ceil(loop_config["cpus_per_worker"] - 1e-6)))
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if use_gpu else "cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    run_dir = Path(cfg.run_dir)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = STIV(model_cfg)
    # After a worker-group restart Ray Train hands back the latest reported checkpoint; on a new
    # `stiv train` of an existing run the driver passes the run's latest checkpoint.
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and loop_config["resume_path"]:
        ckpt = ray.train.Checkpoint(loop_config["resume_path"])
    if ckpt is None:
        initialise_from(model, cfg.init_from)
    model.to(device)
    optimizer = build_optimizer(
        model.parameters(),
        cfg.optimizer.name,
        cfg.optimizer.lr,
        cfg.optimizer.beta1,
        cfg.optimizer.beta2,
        cfg.optimizer.weight_decay,
        cfg.optimizer.factored,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_constant(cfg.optimizer.warmup_steps)
    )
    ds_config = {
        # DeepSpeed only books these (our loop feeds the batches): the largest bucket batch.
        "train_micro_batch_size_per_gpu": loop_config["micro_batch"],
        "gradient_accumulation_steps": 1,
        "train_batch_size": loop_config["micro_batch"] * world,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "zero_optimization": {"stage": cfg.scaling.zero_stage},
        # A client optimizer (AdaFactor) under ZeRO needs this (docs/design-notes.md
        # "AdaFactor under ZeRO").
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    # AdaFactor on ZeRO's flat partitions clips per parameter, so the step is the same on any
    # number of ranks (training/optim.py).
    attach_zero_partitions(optimizer, engine.module)
    ema = EMA(engine.module, cfg.ema_decay, cfg.ema_warmup) if rank == 0 else None

    step = 0
    table_version = int(loop_config["table_version"])
    if ckpt is not None:
        with ckpt.as_directory() as ckpt_dir:
            ckpt_dir = Path(ckpt_dir)
            engine.load_checkpoint(str(ckpt_dir / "ds"), tag="state")
            state = json.loads((ckpt_dir / TRAIN_STATE_FILE).read_text())
            step, table_version = int(state["step"]), int(state["table_version"])
            if ema is not None:
                ema.load_state_dict(load_file(str(ckpt_dir / EMA_FILE)))
            rng_file = ckpt_dir / f"rng_rank{rank}.pt"
            if rng_file.is_file():
                _set_rng_state(torch.load(rng_file, weights_only=False))
    metrics_path = run_dir / "metrics.jsonl"
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        _truncate_metrics(metrics_path, step)
        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step)

    index = index_table(
        loop_config["latents_uri"],
        table_version,
        meta["storage_dtype"],
        loop_config["storage_options"],
    )
    if cfg.data.buckets:
        kept = select_buckets(cfg.data, list(index.buckets))
        index = dataclasses.replace(index, buckets={k: index.buckets[k] for k in kept})
    batch_sizes = bucket_batch_sizes(
        cfg.data, list(index.buckets), model_cfg, int(meta["downsample"])
    )
    if rank == 0:
        print(f"per-rank batch sizes: {batch_sizes}")
    null_text = (
        torch.from_numpy(
            np.frombuffer(meta["empty_tokens"], np.float32).reshape(-1, model_cfg.text_dim).copy()
        ),
        torch.from_numpy(np.frombuffer(meta["empty_mask"], np.uint8).astype(bool)),
        torch.from_numpy(np.frombuffer(meta["empty_pooled"], np.float32).copy()),
    )
    null_text = tuple(x.to(device) for x in null_text)

    validator = None
    if rank == 0 and cfg.eval.every_steps:
        from training.validation import Validator

        validator = Validator(
            cfg.eval, model_cfg, meta, null_text, run_dir, bucket_shape(sorted(index.buckets)[0]),
            str(device),
        )  # fmt: skip

    def save_checkpoint(at_step: int, metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            tmp_dir = Path(tmp)
            engine.save_checkpoint(str(tmp_dir / "ds"), tag="state")
            torch.save(_rng_state(), tmp_dir / f"rng_rank{rank}.pt")
            if rank == 0:
                save_file(
                    {k: v.contiguous() for k, v in ema.state_dict().items()},
                    str(tmp_dir / EMA_FILE),
                )
                (tmp_dir / MODEL_CONFIG_FILE).write_text(json.dumps(model_cfg.to_dict()))
                write_encoders(tmp_dir, meta)
                (tmp_dir / TRAIN_STATE_FILE).write_text(
                    json.dumps(
                        {
                            "step": at_step,
                            "table_version": index.version,
                            "seed": cfg.seed,
                            "world_size": world,
                            "batch_sizes": batch_sizes,
                        }
                    )
                )
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(tmp_dir)),
                checkpoint_dir_name=f"checkpoint_{at_step:08d}",
            )

    engine.train()
    last = loop_start = time.perf_counter()
    optim_bytes = None
    # Since the last metric line, on this rank: samples, tokens and training FLOPs.
    interval = {"samples": 0.0, "tokens": 0.0, "flops": 0.0}
    interval_steps = 0
    for step_index, batch in rank_feed(
        index,
        batch_sizes,
        world,
        rank,
        cfg.seed,
        step,
        cfg.max_steps,
        prefetch=cfg.data.prefetch_steps,
        num_cpus=cfg.data.fetch_num_cpus,
        storage_options=loop_config["storage_options"],
        steps_per_fetch=cfg.data.steps_per_fetch,
    ):
        if rank == cfg.debug_kill_rank and step_index == cfg.debug_kill_at_step:
            marker = run_dir / f".killed_rank{rank}_step{step_index}"
            if not marker.exists():
                marker.touch()
                os._exit(1)  # a real worker death: Ray Train restarts the group (FailureConfig)
        batch = {k: v.to(device) for k, v in batch.items()}
        x1, micro_cond = batch["latents"], batch["micro_cond"]
        b, _, frames = x1.shape[:3]
        # Per-(step, rank) noise: a restart or resume draws exactly the same noise.
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step_index * 1009 + rank)
        given_frames = _given_frames(cfg.objective, b, frames)
        p_text, p_image = cfg.objective.text_dropout, cfg.objective.image_dropout
        if cfg.objective.tasks:
            # Each sample draws its task, window and stride (training/tasks.py).
            tb = build_task_batch(
                cfg.objective.tasks, x1, micro_cond,
                bucket=latent_bucket_key(x1.shape, int(meta["downsample"])),
                num_frames=cfg.objective.num_frames, text_dropout=p_text,
                image_dropout=p_image, generator=generator,
            )  # fmt: skip
            x1, micro_cond, given_frames = tb.latents, tb.micro_cond, tb.given_frames
            p_text, p_image = tb.p_text, tb.p_image
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_gpu):
            loss, _ = training_loss(
                engine,
                x1,
                batch["text_tokens"],
                batch["text_mask"],
                batch["text_pooled"],
                micro_cond,
                given_frames=given_frames,
                null_text=null_text,
                p_text=p_text,
                p_image=p_image,
                timestep_sampler=cfg.objective.timestep_sampler,
                generator=generator,
            )
        engine.backward(loss)
        engine.step()
        step = step_index + 1
        if ema is not None:
            ema.update(engine.module, step)
        if optim_bytes is None:
            optim_bytes = optimizer_state_bytes(getattr(optimizer, "optimizer", optimizer))

        latent_shape = list(x1.shape[1:])
        interval_steps += 1
        interval["samples"] += b
        interval["tokens"] += b * _tokens_per_sample(model_cfg, latent_shape)
        interval["flops"] += b * flops_per_sample(
            model_cfg, latent_shape, batch["text_tokens"].shape[1]
        )
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            # Rank 0's clock decides the time budget, so every rank stops at the same step.
            out_of_time = (
                rank == 0
                and cfg.max_minutes > 0
                and time.perf_counter() - loop_start > cfg.max_minutes * 60
            )
            stats = torch.tensor(
                [
                    loss.item(),
                    interval["samples"],
                    interval["tokens"],
                    interval["flops"],
                    float(out_of_time),
                ],
                dtype=torch.float64,
            )
            dist.all_reduce(stats)  # sums over ranks
            grad_norm = engine.get_global_grad_norm()
            now = time.perf_counter()
            elapsed, last = now - last, now
            interval = dict.fromkeys(interval, 0.0)
            steps_logged, interval_steps = interval_steps, 0
            logged = {
                "step": step,
                "loss": stats[0].item() / world,  # mean of the ranks' batch losses
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "samples_per_s": stats[1].item() / elapsed,
                "tokens_per_s": stats[2].item() / elapsed,
                "tokens_per_step": stats[2].item() / max(1, steps_logged),  # over all ranks
                "optimizer_state_bytes_rank0": optim_bytes,
            }
            if use_gpu:
                # MFU: counted training FLOPs (flops_per_sample) over the GPUs' dense bf16 peak.
                logged["mfu"] = stats[3].item() / elapsed / (world * cfg.gpu_peak_tflops * 1e12)
            if rank == 0:
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(logged) + "\n")
                for key, value in logged.items():
                    if key != "step" and value is not None:
                        writer.add_scalar(f"train/{key}", value, step)
            if stats[4].item() > 0:
                if rank == 0:
                    print(f"max_minutes ({cfg.max_minutes}) reached: stopping at step {step}")
                save_checkpoint(step, {"step": step, "loss": loss.item()})
                break
        if validator is not None and step % cfg.eval.every_steps == 0:
            validator(ema.state_dict(), step, writer)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            save_checkpoint(step, {"step": step, "loss": loss.item()})
    if writer is not None:
        writer.close()


def _tokens_per_sample(model_cfg, latent_shape: list[int]) -> int:
    _, t, h, w = latent_shape
    return (
        max(1, t // model_cfg.temporal_patch_size)
        * (h // model_cfg.patch_size)
        * (w // model_cfg.patch_size)
    )


# --------------------------------------------------------------------------- driver


def run_train(
    config_path: str | Path | None,
    overrides: list[str] | None = None,
    address: str | None = None,
    resume: str = "auto",
) -> dict[str, Any]:
    """Train one stage; returns a summary (steps, final loss, run dir, seconds, scaling).

    Rerunning the same command continues from the run's latest checkpoint (`resume="auto"`,
    also what `--resume` means); `resume="require"` additionally insists that one exists."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from data_engine.store import Database
    from stiv_core.ray_connect import connect_ray
    from training.checkpoint import list_checkpoints

    start_s = time.time()
    cfg = load_train_config(config_path, overrides)
    if resume not in RESUME_MODES:
        raise ConfigError(f"--resume: must be one of {list(RESUME_MODES)}, got {resume!r}")
    run_dir = Path(cfg.run_dir)
    meta = read_latents_meta(cfg.db, cfg.latents_table)
    model_cfg = resolve_model_config(cfg, meta)
    db = Database(cfg.db)
    table_version = cfg.data.table_version or db.table(cfg.latents_table).version

    started = connect_ray(address)
    try:
        scaling = resolve_scaling(cfg.scaling, ray.cluster_resources())
        keys = sorted(set(db.table(cfg.latents_table, table_version).to_table(columns=["bucket"])
                          ["bucket"].to_pylist()))  # fmt: skip
        keys = select_buckets(cfg.data, keys)
        batch_sizes = bucket_batch_sizes(cfg.data, keys, model_cfg, int(meta["downsample"]))
        check_tasks_fit(cfg.objective, keys)
        resumed = resume_checkpoint(run_dir, resume, scaling["num_workers"], cfg.seed, batch_sizes)
        checkpoints = [resumed] if resumed else []
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "resolved_config.yaml")
        (run_dir / "model_config.json").write_text(json.dumps(model_cfg.to_dict(), indent=1))
        loop_config = {
            "config": to_dict(cfg),
            "model_config": model_cfg.to_dict(),
            "meta": meta,
            "latents_uri": db.uri_for(cfg.latents_table),
            "storage_options": db.storage_options,
            "table_version": table_version,
            "resume_path": str(checkpoints[-1][1]) if checkpoints else "",
            "micro_batch": max(batch_sizes.values()),
            **scaling,
        }
        resources = {"CPU": scaling["cpus_per_worker"]}
        if scaling["use_gpu"]:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=scaling["num_workers"],
                use_gpu=scaling["use_gpu"],
                resources_per_worker=resources,
                placement_strategy=cfg.scaling.placement_strategy,
            ),
            run_config=ray.train.RunConfig(
                name=run_dir.name,
                storage_path=str(run_dir.parent),
                failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            ),
        )
        trainer.fit()
    finally:
        if started:
            ray.shutdown()
    metrics = [
        json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()
    ]
    final = list_checkpoints(run_dir)
    return {
        "run_dir": str(run_dir),
        "steps": final[-1][0] if final else 0,
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "resumed_from_step": checkpoints[-1][0] if checkpoints else 0,
        "checkpoint": str(final[-1][1]) if final else None,
        "num_workers": scaling["num_workers"],
        "batch_sizes": batch_sizes,
        "cpus_per_worker": scaling["cpus_per_worker"],
        "use_gpu": scaling["use_gpu"],
        "parameters": int(sum(np.prod(s) for s in param_shapes(model_cfg))),
        "seconds": round(time.time() - start_s, 1),
    }


def param_shapes(model_cfg) -> list[tuple[int, ...]]:
    """Parameter shapes counted on the meta device (no memory)."""
    import torch

    from model.network import STIV

    with torch.device("meta"):
        model = STIV(model_cfg)
    return [tuple(p.shape) for p in model.parameters()]


# --------------------------------------------------------------------------- dry run


DRY_RUN_DOWNSAMPLE = 8  # latent cells per pixel side assumed without a latents table (a VAE)


def dry_run(
    config_path: str | Path | None,
    overrides: list[str] | None = None,
    buckets: list[str] | None = None,
) -> dict[str, Any]:
    """ "Will it fit": the resolved config, parameters, FLOPs per sample, tokens and per-rank
    batch of each bucket, the estimated memory per rank and the ZeRO partition sizes, without
    starting Ray or allocating the model (meta device, `model.info.activation_bytes`).

    Buckets and encoders come from the latents table when it exists; otherwise `buckets`
    (`FRAMESxHEIGHTxWIDTH` in pixels) and the preset's encoder dimensions with an 8x VAE are
    assumed (and said so). Ranks: `scaling.num_workers` (0 counts as 1)."""
    from model.info import activation_bytes, model_info
    from training.checkpoint import CheckpointError
    from training.optim import analytic_optimizer_bytes

    cfg = load_train_config(config_path, overrides)
    meta, counts, assumed = None, {}, []
    local_missing = (
        is_local(cfg.db) and not (Path(local_path(cfg.db)) / f"{cfg.latents_table}.lance").is_dir()
    )
    if not local_missing:  # (skips importing Lance when there is nothing to read)
        with contextlib.suppress(FileNotFoundError, ValueError, OSError):
            meta = read_latents_meta(cfg.db, cfg.latents_table)
    if meta is not None and not buckets:
        from data_engine.store import Database

        table = Database(cfg.db).table(cfg.latents_table, cfg.data.table_version or None)
        for key in table.to_table(columns=["bucket"])["bucket"].to_pylist():
            counts[key] = counts.get(key, 0) + 1
        keys = select_buckets(cfg.data, sorted(counts))
    else:
        if not buckets:
            raise ConfigError(
                f"--dry-run: no latents table {cfg.latents_table!r} in {cfg.db}; give the "
                "shapes with --bucket FRAMESxHEIGHTxWIDTH"
            )
        keys = []
        for bucket in buckets:
            parts = bucket.lower().lstrip("f").split("x")
            if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ConfigError(
                    f"--bucket: {bucket!r} is not FRAMESxHEIGHTxWIDTH, e.g. 20x256x256"
                )
            keys.append("f" + "x".join(parts))
    if meta is None:
        from model.config import get_preset

        preset = get_preset(cfg.model.preset, **cfg.model.overrides)
        meta = {
            "latent_channels": preset.in_channels,
            "text_dim": preset.text_dim,
            "text_len": preset.max_text_tokens,
            "downsample": DRY_RUN_DOWNSAMPLE,
        }
        assumed.append(
            f"no latents table: the preset's encoder dimensions (latent channels "
            f"{preset.in_channels}, text {preset.max_text_tokens} x {preset.text_dim}) and a "
            f"{DRY_RUN_DOWNSAMPLE}x VAE"
        )
    try:
        model_cfg = resolve_model_config(cfg, meta)
    except CheckpointError:  # the parent run is not here: its RoPE base sizes only move phases
        model_cfg = resolve_model_config(
            dataclasses.replace(cfg, init_from=InitFromSection()), meta
        )
        assumed.append(
            f"init_from.run_dir {cfg.init_from.run_dir} not found: RoPE base not inherited"
        )
    downsample = int(meta["downsample"])
    world = cfg.scaling.num_workers or 1
    if not cfg.scaling.num_workers:
        assumed.append("scaling.num_workers is 0 (one per device): 1 rank counted")
    batch_sizes = bucket_batch_sizes(cfg.data, keys, model_cfg, downsample)
    shapes = param_shapes(model_cfg)
    params = int(sum(np.prod(s) for s in shapes))
    text_len = int(meta["text_len"])

    per_bucket, activation_peak = {}, {"without_checkpointing": 0, "with_checkpointing": 0}
    for key in keys:
        frames, height, width = bucket_shape(key)
        latent = (model_cfg.in_channels, frames, height // downsample, width // downsample)
        # On the meta device the trace costs the same at any batch size.
        acts = activation_bytes(model_cfg, latent, text_len, batch=batch_sizes[key])
        for name, value in acts.items():
            activation_peak[name] = max(activation_peak[name], value)
        tokens = bucket_tokens(model_cfg, key, downsample)
        per_bucket[key] = {
            "samples": counts.get(key),
            "tokens_per_sample": tokens,
            "batch_per_rank": batch_sizes[key],
            "tokens_per_rank_step": tokens * batch_sizes[key],
            "training_flops_per_sample": flops_per_sample(model_cfg, list(latent), text_len),
            "activation_bytes_per_rank": acts,
        }

    zero = cfg.scaling.zero_stage
    partition = math.ceil(params / world)
    if zero:
        option = "adamw-zero2" if cfg.optimizer.name == "adamw" else "adafactor-zero2"
    elif cfg.optimizer.name == "adamw":
        option = "adamw-replicated"
    else:
        option = "adafactor-factored" if cfg.optimizer.factored else "adamw-replicated"
    # DeepSpeed's default reduce bucket (5e8 elements) holds gradients before they are reduced.
    reduce_bucket = 4 * min(params, 500_000_000) if zero == 2 else 0
    memory = {
        "weights_fp32": 4 * params,
        "gradients": 4 * (partition if zero == 2 else params) + reduce_bucket,
        "fp32_partition": 4 * partition if zero else 0,
        "optimizer_state": analytic_optimizer_bytes(shapes, option, world),
        "ema_fp32_rank0": 4 * params,
        "activations_without_checkpointing": activation_peak["without_checkpointing"],
        "activations_with_checkpointing": activation_peak["with_checkpointing"],
    }
    used = "with" if model_cfg.grad_checkpointing else "without"
    memory["total_rank0"] = (
        sum(v for k, v in memory.items() if not k.startswith("activations"))
        + memory[f"activations_{used}_checkpointing"]
    )
    info = model_info(model_cfg)
    return {
        "config": to_dict(cfg),
        "model": {
            "preset": cfg.model.preset,
            "parameters": params,
            "parameters_without_temporal": info["parameters_without_temporal"],
            "grad_checkpointing": model_cfg.grad_checkpointing,
        },
        "world_size": world,
        "zero_stage": zero,
        "zero_partition": {
            "elements_per_rank": partition if zero else params,
            "optimizer_option": option,
            "optimizer_bytes_per_rank": memory["optimizer_state"],
        },
        "buckets": per_bucket,
        "memory_bytes_per_rank": memory,
        "memory_gib_per_rank": {k: round(v / 2**30, 3) for k, v in memory.items()},
        "notes": [
            "activations traced on the meta device in fp32 (every saved tensor in full); bf16 "
            "autocast on GPUs saves most of them at half the size",
            *assumed,
        ],
    }
