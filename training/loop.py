"""One rank of `stiv train` (Ray Train's `train_loop_per_worker`), in the order it runs:

1. build: the model with the same seed on every rank, started from the parent run's EMA
   weights (`init_from`) unless a checkpoint is restored, wrapped in DeepSpeed ZeRO;
2. restore: engine shards, EMA, step, table version and this rank's RNG from a checkpoint
   (Ray Train's own after a group restart, or the run's latest on a new `stiv train`);
3. step: the rank's deterministic bucket-per-batch feed (`training.data`), per-(step, rank)
   noise, and per-sample tasks in the application stages (`training.tasks`);
4. log: one metric line per `log_every` steps, summed over ranks (`MetricLog`), which also
   carries the wall-clock budget so every rank stops at the same step;
5. save: a checkpoint directory reported to Ray Train (`save_checkpoint`).

Precision: fp32 on the CPU (gloo; fp16 is unavailable there), bf16 autocast over fp32 weights
on GPUs, so the fp32 master weights are the parameters themselves and are what checkpoints hold
(docs/design-notes.md "Checkpoints": rebuilding masters from bf16 caused loss surges).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.info import flops_per_sample, tokens_per_sample
from training.config import InitFromSection, ObjectiveSection, TrainConfig
from training.latents import null_text as encoded_empty_prompt
from training.plan import (
    WorkerPlan,
    bucket_batch_sizes,
    bucket_shape,
    latent_bucket_key,
    select_buckets,
)


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


@dataclass(frozen=True)
class Place:
    """This worker's rank in the group and the device it trains on."""

    rank: int
    world: int
    device: torch.device
    use_gpu: bool


@dataclass
class Engine:
    """What one rank trains: the DeepSpeed engine with its optimizer and schedule, and the
    fp32 EMA of the weights (rank 0 only)."""

    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: Any  # DeepSpeed's ZeRO wrapper around the client optimizer
    scheduler: Any
    ema: Any | None  # training.optim.EMA
    last_loss: torch.Tensor | None = None  # this rank's last loss (a tensor: no sync per step)


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce.

    DeepSpeed's CPU backend JIT-builds that op with gcc when its process group starts, though
    only tensor-parallel inference (`inference_all_reduce`) uses it; training reduces through
    torch.distributed (gloo). The build took 24-120 s per worker on 2 cores: in every fresh
    environment, and again whenever another environment's sources had been built into the
    shared torch_extensions cache. Marking the op incompatible is the path DeepSpeed itself
    takes on a machine that cannot build it (docs/design-notes.md "Ray Train and DeepSpeed on
    the CPU")."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build(cfg: TrainConfig, model_cfg, plan: WorkerPlan, place: Place, restoring: bool) -> Engine:
    """The model (same initial weights on every rank), its start (`init_from`, skipped when a
    checkpoint will be restored), the optimizer and warm-up schedule, wrapped in DeepSpeed."""
    import deepspeed

    from model.network import STIV
    from training.optim import EMA, attach_zero_partitions, build_optimizer, warmup_constant

    torch.manual_seed(cfg.seed)
    model = STIV(model_cfg)
    if not restoring:
        initialise_from(model, cfg.init_from)
    model.to(place.device)
    opt = cfg.optimizer
    optimizer = build_optimizer(
        model.parameters(), opt.name, opt.lr, opt.beta1, opt.beta2, opt.weight_decay, opt.factored
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(opt.warmup_steps))
    ds_config = {
        # DeepSpeed only books these (our loop feeds the batches): the largest bucket batch.
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": plan.micro_batch * place.world,
        "gradient_clipping": opt.grad_clip,
        "zero_optimization": {"stage": cfg.scaling.zero_stage},
        # A client optimizer (AdaFactor) under ZeRO needs this (docs/design-notes.md
        # "AdaFactor under ZeRO").
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if not place.use_gpu:
        skip_shm_comm_build()
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    # AdaFactor on ZeRO's flat partitions clips per parameter, so the step is the same on any
    # number of ranks (training/optim.py).
    attach_zero_partitions(optimizer, engine.module)
    ema = EMA(engine.module, cfg.ema_decay, cfg.ema_warmup) if place.rank == 0 else None
    return Engine(engine, optimizer, scheduler, ema)


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def restore(ckpt_dir: Path, trained: Engine, place: Place) -> tuple[int, int]:
    """Load a checkpoint into the engine (this rank's ZeRO shards), the EMA and this rank's
    RNG; returns (step, latents table version) it was written at."""
    from safetensors.torch import load_file

    from training.checkpoint import EMA_FILE, TRAIN_STATE_FILE

    trained.engine.load_checkpoint(str(ckpt_dir / "ds"), tag="state")
    state = json.loads((ckpt_dir / TRAIN_STATE_FILE).read_text())
    if trained.ema is not None:
        trained.ema.load_state_dict(load_file(str(ckpt_dir / EMA_FILE)))
    rng_file = ckpt_dir / f"rng_rank{place.rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return int(state["step"]), int(state["table_version"])


def save_checkpoint(
    trained: Engine, place: Place, at_step: int, state: dict[str, Any], model_config: dict,
    meta: dict[str, Any],
) -> None:  # fmt: skip
    """Write this rank's part of the checkpoint at `at_step` and report it to Ray Train, which
    moves it into the run directory (`checkpoint_{step:08d}`) and keeps `keep_checkpoints`.
    Rank 0 adds the EMA, the model config, the encoders (`meta`) and the train `state`."""
    import ray.train
    from safetensors.torch import save_file

    from training.checkpoint import EMA_FILE, MODEL_CONFIG_FILE, TRAIN_STATE_FILE, write_encoders

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        trained.engine.save_checkpoint(str(tmp_dir / "ds"), tag="state")
        torch.save(_rng_state(), tmp_dir / f"rng_rank{place.rank}.pt")
        if place.rank == 0:
            ema = trained.ema.state_dict()
            save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp_dir / EMA_FILE))
            (tmp_dir / MODEL_CONFIG_FILE).write_text(json.dumps(model_config))
            write_encoders(tmp_dir, meta)
            (tmp_dir / TRAIN_STATE_FILE).write_text(json.dumps({"step": at_step, **state}))
        ray.train.report(
            {"step": at_step, "loss": float(trained.last_loss)},
            checkpoint=ray.train.Checkpoint.from_directory(str(tmp_dir)),
            checkpoint_dir_name=f"checkpoint_{at_step:08d}",
        )


def given_frames_mask(objective: ObjectiveSection, batch: int, frames: int):
    """The stage's frame-replacement mask for a batch of `frames` latent frames (None: no frame
    is given, as in T2I and T2V)."""
    from model.flow import endpoints_mask, first_frames_mask

    if objective.given_frames == "none" or frames < 2:
        return None
    if objective.given_frames == "first":
        return first_frames_mask(batch, frames, 1)
    if objective.given_frames == "first_k":
        return first_frames_mask(batch, frames, min(objective.num_given_frames, frames - 1))
    return endpoints_mask(batch, frames)


def train_step(
    trained: Engine, cfg: TrainConfig, batch: dict[str, torch.Tensor], step_index: int,
    place: Place, downsample: int, null_text: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One optimizer step on this rank's batch; returns (loss, the latents trained on)."""
    from model.flow import training_loss
    from training.tasks import build_task_batch

    batch = {k: v.to(place.device) for k, v in batch.items()}
    x1, micro_cond = batch["latents"], batch["micro_cond"]
    b, _, frames = x1.shape[:3]
    # Per-(step, rank) noise: a restart or resume draws exactly the same noise.
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step_index * 1009 + place.rank)
    given_frames = given_frames_mask(cfg.objective, b, frames)
    p_text, p_image = cfg.objective.text_dropout, cfg.objective.image_dropout
    if cfg.objective.tasks:
        # Each sample draws its task, window and stride (training/tasks.py).
        tb = build_task_batch(
            cfg.objective.tasks, x1, micro_cond, bucket=latent_bucket_key(x1.shape, downsample),
            num_frames=cfg.objective.num_frames, text_dropout=p_text, image_dropout=p_image,
            generator=generator,
        )  # fmt: skip
        x1, micro_cond, given_frames = tb.latents, tb.micro_cond, tb.given_frames
        p_text, p_image = tb.p_text, tb.p_image
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=place.use_gpu):
        loss, _ = training_loss(
            trained.engine, x1, batch["text_tokens"], batch["text_mask"], batch["text_pooled"],
            micro_cond, given_frames=given_frames, null_text=null_text, p_text=p_text,
            p_image=p_image, timestep_sampler=cfg.objective.timestep_sampler, generator=generator,
        )  # fmt: skip
    trained.engine.backward(loss)
    trained.engine.step()
    trained.last_loss = loss.detach()
    return loss, x1


def _truncate_metrics(path: Path, last_step: int) -> None:
    """After a restart, drop metric lines past the restored step (they will be recomputed)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln)["step"] <= last_step]
    path.write_text("".join(f"{ln}\n" for ln in kept))


class MetricLog:
    """The run's metric lines (`metrics.jsonl` and TensorBoard, rank 0) and the time budget.

    Every rank counts its samples, tokens and training FLOPs since the last line; at a log step
    the counts and rank 0's "out of time" flag are summed over the ranks, so throughput covers
    the whole group and every rank learns at once that the budget is spent."""

    def __init__(self, cfg: TrainConfig, model_cfg, place: Place, step: int) -> None:
        self.cfg, self.model_cfg, self.place = cfg, model_cfg, place
        self.path = Path(cfg.run_dir) / "metrics.jsonl"
        self.writer = None
        if place.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            _truncate_metrics(self.path, step)
            self.writer = SummaryWriter(str(Path(cfg.run_dir) / "tensorboard"), purge_step=step)
        self.started = self.last = time.perf_counter()
        self.samples = self.tokens = self.flops = 0.0
        self.steps = 0

    def add(self, latents: torch.Tensor, text_len: int) -> None:
        b, shape = latents.shape[0], list(latents.shape[1:])
        self.steps += 1
        self.samples += b
        self.tokens += b * tokens_per_sample(self.model_cfg, shape)
        self.flops += b * flops_per_sample(self.model_cfg, shape, text_len)

    def due(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == self.cfg.max_steps

    def log(self, step: int, loss: torch.Tensor, trained: Engine, optim_bytes: int | None) -> bool:
        """Write the line for `step` (a collective: every rank calls it at the same step);
        returns whether the time budget is spent."""
        import torch.distributed as dist

        cfg, world = self.cfg, self.place.world
        # Rank 0's clock decides the time budget, so every rank stops at the same step.
        out_of_time = (
            self.place.rank == 0
            and cfg.max_minutes > 0
            and time.perf_counter() - self.started > cfg.max_minutes * 60
        )
        stats = torch.tensor(
            [loss.item(), self.samples, self.tokens, self.flops, float(out_of_time)],
            dtype=torch.float64,
        )
        dist.all_reduce(stats)  # sums over ranks
        grad_norm = trained.engine.get_global_grad_norm()
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        logged = {
            "step": step,
            "loss": stats[0].item() / world,  # mean of the ranks' batch losses
            "lr": trained.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "samples_per_s": stats[1].item() / elapsed,
            "tokens_per_s": stats[2].item() / elapsed,
            "tokens_per_step": stats[2].item() / max(1, self.steps),  # over all ranks
            "optimizer_state_bytes_rank0": optim_bytes,
        }
        if self.place.use_gpu:
            # MFU: counted training FLOPs (flops_per_sample) over the GPUs' dense bf16 peak.
            logged["mfu"] = stats[3].item() / elapsed / (world * cfg.gpu_peak_tflops * 1e12)
        self.samples = self.tokens = self.flops = 0.0
        self.steps = 0
        if self.writer is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps(logged) + "\n")
            for key, value in logged.items():
                if key != "step" and value is not None:
                    self.writer.add_scalar(f"train/{key}", value, step)
        return stats[4].item() > 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _maybe_die(cfg: TrainConfig, place: Place, step_index: int) -> None:
    """Fault injection for the recovery tests: the configured rank exits once, at its step."""
    if place.rank == cfg.debug_kill_rank and step_index == cfg.debug_kill_at_step:
        marker = Path(cfg.run_dir) / f".killed_rank{place.rank}_step{step_index}"
        if not marker.exists():
            marker.touch()
            os._exit(1)  # a real worker death: Ray Train restarts the group (FailureConfig)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop: build, restore, then step, log and save (the module docstring)."""
    import ray.train

    from training.data import index_table, rank_feed
    from training.optim import optimizer_state_bytes

    plan = WorkerPlan.from_loop_config(loop_config)
    cfg, model_cfg, meta = plan.train_config(), plan.stiv_config(), plan.meta
    ctx = ray.train.get_context()
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if plan.use_gpu else "cpu")
    place = Place(ctx.get_world_rank(), ctx.get_world_size(), device, plan.use_gpu)
    # A rank granted 1.5 CPUs uses 2 threads (ceil): its fractional share is real CPU time.
    torch.set_num_threads(max(1, math.ceil(plan.cpus_per_worker - 1e-6)))
    if plan.use_gpu:
        torch.cuda.set_device(device)

    # After a worker-group restart Ray Train hands back the latest reported checkpoint; on a new
    # `stiv train` of an existing run the driver passes the run's latest checkpoint.
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and plan.resume_path:
        ckpt = ray.train.Checkpoint(plan.resume_path)
    trained = build(cfg, model_cfg, plan, place, restoring=ckpt is not None)
    step, table_version = 0, plan.table_version
    if ckpt is not None:
        with ckpt.as_directory() as ckpt_dir:
            step, table_version = restore(Path(ckpt_dir), trained, place)

    index = index_table(
        plan.latents_uri, table_version, meta["storage_dtype"], plan.storage_options
    )
    if cfg.data.buckets:
        kept = select_buckets(cfg.data, list(index.buckets))
        index = dataclasses.replace(index, buckets={k: index.buckets[k] for k in kept})
    downsample = int(meta["downsample"])
    batch_sizes = bucket_batch_sizes(cfg.data, list(index.buckets), model_cfg, downsample)
    if place.rank == 0:
        print(f"per-rank batch sizes: {batch_sizes}")
    # The encoded empty prompt: what text dropout trains on, so classifier-free guidance has
    # the same unconditional input at sampling.
    null_text = tuple(torch.from_numpy(x).to(device) for x in encoded_empty_prompt(meta))
    validator = None
    if place.rank == 0 and cfg.eval.every_steps:
        from training.validation import Validator

        first_bucket = bucket_shape(sorted(index.buckets)[0])
        validator = Validator(
            cfg.eval, model_cfg, meta, null_text, Path(cfg.run_dir), first_bucket, str(device)
        )
    state = {"table_version": index.version, "seed": cfg.seed, "world_size": place.world,
             "batch_sizes": batch_sizes}  # fmt: skip

    log = MetricLog(cfg, model_cfg, place, step)
    trained.engine.train()
    optim_bytes = None
    feed = rank_feed(
        index, batch_sizes, place.world, place.rank, cfg.seed, step, cfg.max_steps,
        prefetch=cfg.data.prefetch_steps, num_cpus=cfg.data.fetch_num_cpus,
        storage_options=plan.storage_options, steps_per_fetch=cfg.data.steps_per_fetch,
    )  # fmt: skip
    for step_index, batch in feed:
        _maybe_die(cfg, place, step_index)
        loss, latents = train_step(trained, cfg, batch, step_index, place, downsample, null_text)
        step = step_index + 1
        if trained.ema is not None:
            trained.ema.update(trained.engine.module, step)
        if optim_bytes is None:
            optim_bytes = optimizer_state_bytes(
                getattr(trained.optimizer, "optimizer", trained.optimizer)
            )
        log.add(latents, batch["text_tokens"].shape[1])
        if log.due(step) and log.log(step, loss, trained, optim_bytes):
            if place.rank == 0:
                print(f"max_minutes ({cfg.max_minutes}) reached: stopping at step {step}")
            save_checkpoint(trained, place, step, state, model_cfg.to_dict(), meta)
            break
        if validator is not None and step % cfg.eval.every_steps == 0:
            validator(trained.ema.state_dict(), step, log.writer)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            save_checkpoint(trained, place, step, state, model_cfg.to_dict(), meta)
    log.close()
