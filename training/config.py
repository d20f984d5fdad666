"""A training stage's config (`stiv train --config`): the YAML sections and their checks.

Every field is validated when the config loads, before Ray starts, and the error names the
field (`optimizer.lr: must be > 0`). The recipe's numbers are the defaults (docs/recipe.md
"Training").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stiv_core.config import load_config
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


def load_train_config(
    config_path: str | Path | None, overrides: list[str] | None = None
) -> TrainConfig:
    """The stage config with every path field absolute (the one place paths are resolved:
    workers run in their own directories, so a relative `init_from.temporal_run_dir` would
    point elsewhere there)."""
    cfg = load_config(TrainConfig, config_path, overrides)
    resolve_path_fields(cfg, TRAIN_PATH_FIELDS)
    return cfg
