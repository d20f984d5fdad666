"""`stiv train --dry-run`: "will it fit", answered without Ray or the model's memory."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from model.info import flops_per_sample, param_shapes
from stiv_core.config import ConfigError, to_dict
from stiv_core.uris import is_local, local_path
from training.config import InitFromSection, load_train_config
from training.latents import read_meta
from training.plan import (
    bucket_batch_sizes,
    bucket_shape,
    bucket_tokens,
    resolve_model_config,
    select_buckets,
)

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
            meta = read_meta(cfg.db, cfg.latents_table)
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
