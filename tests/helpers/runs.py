"""A run directory in the layout training writes, without a Ray Train run: for the tests of
initialisation, resume checks, export and generation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_checkpoint(
    run_dir: Path, model: Any, step: int = 10, meta: dict | None = None, **state: Any
) -> Path:
    """`run_dir/checkpoint_{step}` holding `model`'s weights as the EMA, its config and a train
    state (`state` adds fields such as world_size and seed); with `meta` (a latents meta row)
    also the encoders, so generation can load it. Returns the checkpoint directory."""
    from safetensors.torch import save_file

    from training.checkpoint import write_encoders

    ckpt = run_dir / f"checkpoint_{step:08d}"
    ckpt.mkdir(parents=True)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(ckpt / "ema.safetensors"))
    (ckpt / "model_config.json").write_text(json.dumps(model.cfg.to_dict()))
    (ckpt / "train_state.json").write_text(json.dumps({"step": step, "table_version": 1, **state}))
    if meta is not None:
        write_encoders(ckpt, meta)
    return ckpt
