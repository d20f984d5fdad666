"""Checkpoint layout, discovery and EMA loading (for `init_from`, `stiv generate`, `stiv export`).

A checkpoint is one directory that every Ray Train worker reports
(docs/design-notes.md "Checkpoints"):
    ds/state/...               DeepSpeed shards: model states (rank 0), each rank's optimizer
                               partition (ZeRO) and the LR scheduler
    ema.safetensors            fp32 EMA weights, complete (ZeRO <= 2 keeps full parameters on
                               every rank, so rank 0's EMA is already consolidated)
    model_config.json          STIVConfig.to_dict()
    train_state.json           step, table version, seed, world size (the data position)
    encoders.json              the latent/text encoders the latents were made with (generation
                               must decode with the same ones) and the latents table's fields
    null_text.safetensors      the encoded empty prompt (unconditional pass of JIT-CFG)
    rng_rank{r}.pt             each rank's torch / numpy / python RNG state
Ray Train stores them under the run directory as `checkpoint_*`; the latest is the one with the
highest step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

EMA_FILE = "ema.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
TRAIN_STATE_FILE = "train_state.json"
ENCODERS_FILE = "encoders.json"
NULL_TEXT_FILE = "null_text.safetensors"
RESOLVED_CONFIG_FILE = "resolved_config.yaml"  # in the run directory, written by stiv train


class CheckpointError(FileNotFoundError):
    """No usable checkpoint where one was expected."""


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under a run directory, oldest first."""
    found = []
    for state_file in Path(run_dir).glob(f"**/{TRAIN_STATE_FILE}"):
        ckpt = state_file.parent
        if (ckpt / EMA_FILE).is_file() and (ckpt / MODEL_CONFIG_FILE).is_file():
            step = int(json.loads(state_file.read_text())["step"])
            found.append((step, ckpt))
    return sorted(found, key=lambda item: (item[0], str(item[1])))


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint with the highest step; raises CheckpointError when there is none."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise CheckpointError(f"{run_dir}: no checkpoint found (train it first, or check the path)")
    return checkpoints[-1][1]


def load_ema_state(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], Any]:
    """(fp32 EMA state dict, STIVConfig) of a run's latest checkpoint."""
    from safetensors.torch import load_file

    from model.config import STIVConfig

    ckpt = latest_checkpoint(run_dir)
    config = STIVConfig.from_dict(json.loads((ckpt / MODEL_CONFIG_FILE).read_text()))
    return load_file(str(ckpt / EMA_FILE)), config


def write_encoders(directory: str | Path, meta: dict[str, Any]) -> None:
    """Store the latents table's meta row: encoder provenance as JSON, empty prompt as tensors."""
    from safetensors.torch import save_file

    from training.latents import null_text

    directory = Path(directory)
    info = {k: v for k, v in meta.items() if not isinstance(v, bytes)}
    (directory / ENCODERS_FILE).write_text(json.dumps(info, indent=1))
    tokens, mask, pooled = (torch.from_numpy(x) for x in null_text(meta))
    save_file({"tokens": tokens, "mask": mask, "pooled": pooled}, str(directory / NULL_TEXT_FILE))


def load_encoders(
    path: str | Path,
) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(encoder info, (empty-prompt tokens (L, D), mask (L,), pooled (D,))) of a run's latest
    checkpoint or of an exported weights file. The info names the latent encoder (`encoder_kind`,
    `pixel_patch`, `vae_path`) and text encoder (`text_path`, `text_len`) to generate with."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            if "encoders" not in metadata:
                raise CheckpointError(f"{path}: exported without encoder information")
            names = [k for k in handle.keys() if k.startswith("null_text.")]  # noqa: SIM118
            tensors = {k: handle.get_tensor(k) for k in names}
        info = json.loads(metadata["encoders"])
        null = (tensors["null_text.tokens"], tensors["null_text.mask"], tensors["null_text.pooled"])
        return info, null
    ckpt = latest_checkpoint(path)
    info = json.loads((ckpt / ENCODERS_FILE).read_text())
    tensors = load_file(str(ckpt / NULL_TEXT_FILE))
    return info, (tensors["tokens"], tensors["mask"], tensors["pooled"])


def load_ema_model(run_dir: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """The latest checkpoint's EMA weights in a ready `STIV` (eval mode) and its config.

    `run_dir` may also be an exported `.safetensors` file (`export_ema`)."""
    from model.network import STIV

    path = Path(run_dir)
    if path.is_file():
        state, config = load_exported(path)
    else:
        state, config = load_ema_state(path)
    model = STIV(config)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), config


def export_ema(run_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the consolidated EMA weights, model config (metadata), encoder info (metadata) and
    the encoded empty prompt (`null_text.*` tensors) to one safetensors file."""
    from safetensors.torch import save_file

    state, config = load_ema_state(run_dir)
    ckpt = latest_checkpoint(run_dir)
    info, null = load_encoders(run_dir)
    step = json.loads((ckpt / TRAIN_STATE_FILE).read_text())["step"]
    metadata = {
        "stiv_config": json.dumps(config.to_dict()),
        "encoders": json.dumps(info),
        "step": str(step),
        "source": str(ckpt),
        # The tasks it was trained on, so generating from the file uses their strides as
        # generating from the run does (training/generate.py `Generator.task_stride`).
        "tasks": json.dumps(run_tasks(run_dir)),
    }
    tensors = {k: v.contiguous() for k, v in state.items()}
    # The empty prompt travels with the weights (JIT-CFG's unconditional pass needs it).
    tensors.update({f"null_text.{k}": v for k, v in zip(("tokens", "mask", "pooled"), null)})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return {"out": str(out), "step": step, "parameters": sum(v.numel() for v in state.values())}


def run_tasks(checkpoint: str | Path) -> list[dict[str, Any]]:
    """The training tasks (`objective.tasks` of the resolved config) of a run directory or of
    a file `export_ema` wrote; [] for a stage without tasks or a file exported before the
    tasks travelled with it."""
    import yaml

    path = Path(checkpoint)
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            return list(json.loads((handle.metadata() or {}).get("tasks") or "[]"))
    config_path = path / RESOLVED_CONFIG_FILE
    if not config_path.is_file():
        return []
    config = yaml.safe_load(config_path.read_text()) or {}
    return list((config.get("objective") or {}).get("tasks") or [])


def load_exported(path: str | Path) -> tuple[dict[str, torch.Tensor], Any]:
    """(state dict, STIVConfig) from a file written by `export_ema`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from model.config import STIVConfig

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    if "stiv_config" not in metadata:
        raise CheckpointError(
            f"{path}: not an exported STIV weights file (no stiv_config metadata)"
        )
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("null_text.")}
    return state, STIVConfig.from_dict(json.loads(metadata["stiv_config"]))
