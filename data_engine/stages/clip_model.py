"""The one open_clip loader, frame preprocessor and encoder shared by the CLIP-based stages.

Aesthetic, embedding, category and semantic search all go through `load_open_clip`, so a model
is built, loaded and described (provenance) the same way everywhere. Offline by design: the
architecture comes from open_clip's bundled configs (e.g. "ViT-L-14", "ViT-B-32") or from a
JSON config file registered with `open_clip.add_model_config`, and the weights from a local
checkpoint file; no `pretrained=` tag is ever passed (that would try the model hub).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from data_engine.frames import even_frame_indices
from data_engine.stages.base import StageError
from data_engine.stages.clip_config import (
    ClipModelConfig,
    checkpoint_provenance,
    file_sha256_16,
    require_file,
)

# ----------------------------------------------------------------------------------------------
# Architectures


def _register_model_config(model_name: str, config_path: Path, key: str) -> None:
    """Make open_clip know `model_name` from a JSON file (its stem must be the model name)."""
    if config_path.stem != model_name:
        # open_clip names a registered config after its file stem; a mismatch would silently
        # build a different architecture than the one the user named.
        raise StageError(
            f"{key}.model_config_path: file stem {config_path.stem!r} must equal "
            f"{key}.model_name {model_name!r}"
        )
    wanted = json.loads(config_path.read_text())
    known = open_clip.get_model_config(model_name)
    if known is None:
        open_clip.add_model_config(config_path)
    elif known != wanted:
        raise StageError(
            f"{key}.model_config_path: {model_name!r} is already registered with a different "
            f"architecture; rename the config file"
        )


# ----------------------------------------------------------------------------------------------
# Preprocessing: numpy frames -> normalised tensors, in batch, with torch ops


class FramePreprocessor:
    """(K, H, W, 3) uint8 RGB frames -> (K, 3, S, S) float tensor the image tower expects.

    Follows the model's open_clip preprocess config (size, mean, std, interpolation, resize
    mode) but runs on whole frame stacks with `F.interpolate` (antialiased, like PIL's resize)
    instead of PIL image by image, which is several times faster for video.
    """

    def __init__(self, preprocess_cfg: dict[str, Any], device: str = "cpu") -> None:
        size = preprocess_cfg.get("size", 224)
        self.size_hw: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(preprocess_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = torch.tensor(preprocess_cfg.get("std", open_clip.OPENAI_DATASET_STD))
        self.interpolation: str = preprocess_cfg.get("interpolation", "bicubic")
        self.resize_mode: str = preprocess_cfg.get("resize_mode", "shortest")
        self.fill_color: int = int(preprocess_cfg.get("fill_color", 0))
        self.device = torch.device(device)
        if self.interpolation not in ("bicubic", "bilinear"):
            raise StageError(f"unsupported open_clip interpolation {self.interpolation!r}")
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise StageError(f"unsupported open_clip resize_mode {self.resize_mode!r}")

    def describe(self) -> dict[str, Any]:
        """The preprocessing parameters, for provenance."""
        return {
            "image_size": list(self.size_hw),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
        }

    def _resize(self, x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        x = F.interpolate(
            x, size=out_hw, mode=self.interpolation, antialias=True, align_corners=False
        )
        return x.clamp_(0.0, 255.0)  # bicubic overshoots; PIL clamps to the uint8 range too

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(
                f"expected (K, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}"
            )
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
        x = x.permute(0, 3, 1, 2).float()  # (K, 3, H, W)
        in_h, in_w = x.shape[-2:]
        out_h, out_w = self.size_hw
        if self.resize_mode == "squash":
            x = self._resize(x, (out_h, out_w))
        elif self.resize_mode == "shortest":
            # Resize the short side to the target, then centre-crop (open_clip's default).
            scale = max(out_h / in_h, out_w / in_w)
            new_hw = (max(out_h, round(in_h * scale)), max(out_w, round(in_w * scale)))
            x = self._resize(x, new_hw)
            top, left = (new_hw[0] - out_h) // 2, (new_hw[1] - out_w) // 2
            x = x[..., top : top + out_h, left : left + out_w]
        else:  # "longest": fit inside, pad the rest with fill_color (centred)
            scale = min(out_h / in_h, out_w / in_w)
            new_hw = (min(out_h, round(in_h * scale)), min(out_w, round(in_w * scale)))
            x = self._resize(x, new_hw)
            pad_h, pad_w = out_h - new_hw[0], out_w - new_hw[1]
            pad = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
            x = F.pad(x, pad, value=float(self.fill_color))
        x = x / 255.0
        mean = self.mean.to(x.device).view(1, 3, 1, 1)
        std = self.std.to(x.device).view(1, 3, 1, 1)
        return (x - mean) / std  # (K, 3, S, S)


# ----------------------------------------------------------------------------------------------
# Loading


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def create_model_quietly(model_name: str) -> torch.nn.Module:
    """`open_clip.create_model` with random init, minus its "initialized randomly" warning.

    We always load a checkpoint right after, so that warning would mislead anyone reading
    the worker logs into thinking the scores come from random weights.
    """
    drop = _DropRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        return open_clip.create_model(model_name, pretrained=None, device="cpu")
    finally:
        root.removeFilter(drop)


def load_open_clip(
    model_name: str,
    checkpoint_path: str,
    *,
    config_key: str,
    model_config_path: str = "",
    device: str = "cpu",
) -> tuple[torch.nn.Module, FramePreprocessor, Any, dict[str, Any]]:
    """Build an open_clip model offline and load its local checkpoint.

    `config_key` is the dotted config prefix of these settings (e.g. "aesthetic.clip"): errors
    name `<config_key>.checkpoint_path` / `<config_key>.model_config_path` so the user knows
    which key to set. Returns (model in eval mode, frame preprocessor, tokenizer, provenance).
    """
    checkpoint = require_file(checkpoint_path, f"{config_key}.checkpoint_path")
    provenance: dict[str, Any] = {"model_name": model_name}
    if model_config_path:
        config_file = require_file(model_config_path, f"{config_key}.model_config_path")
        _register_model_config(model_name, config_file, config_key)
        provenance["model_config_path"] = str(config_file.resolve())
        provenance["model_config_sha256"] = file_sha256_16(config_file)
    elif open_clip.get_model_config(model_name) is None:
        raise StageError(
            f"{config_key}.model_name: unknown open_clip architecture {model_name!r} "
            f"(set {config_key}.model_config_path for a custom one)"
        )

    model = create_model_quietly(model_name)
    try:
        open_clip.load_checkpoint(model, str(checkpoint), strict=True)
    except (RuntimeError, KeyError, ValueError, AssertionError) as err:
        # A checkpoint for another architecture fails here (open_clip asserts on resized
        # position embeddings, torch lists missing keys); say which setting is wrong first.
        raise StageError(
            f"{config_key}.checkpoint_path: {checkpoint} does not fit {model_name!r}: {err}"
        ) from err
    model = model.to(device).eval()
    preprocess = FramePreprocessor(open_clip.get_model_preprocess_cfg(model), device=device)
    tokenizer = open_clip.get_tokenizer(model_name)
    provenance.update(checkpoint_provenance(checkpoint))
    provenance["preprocess"] = preprocess.describe()
    return model, preprocess, tokenizer, provenance


def load_clip_from_config(
    cfg: ClipModelConfig, config_key: str
) -> tuple[torch.nn.Module, FramePreprocessor, Any, dict[str, Any]]:
    """`load_open_clip` with the fields of a `ClipModelConfig` found at `config_key`."""
    return load_open_clip(
        cfg.model_name,
        cfg.checkpoint_path,
        config_key=config_key,
        model_config_path=cfg.model_config_path,
        device=cfg.device,
    )


# ----------------------------------------------------------------------------------------------
# The LAION aesthetic head (on CLIP image embeddings)


class AestheticHead(torch.nn.Module):
    """The LAION improved-aesthetic-predictor MLP; keys `layers.{0,2,4,6,7}.{weight,bias}`.

    Dropouts sit at indices 1, 3, 5 exactly as in the published model so the state-dict keys
    match; they are inactive in eval mode.
    """

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """(N, D) L2-normalised CLIP image embeddings -> (N,) scores (~1..10 for real weights)."""
        return self.layers(embedding).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Encoding


@torch.inference_mode()
def encode_frame_stacks(
    model: torch.nn.Module,
    preprocess: FramePreprocessor,
    stacks: list[np.ndarray],
    batch_size: int,
) -> list[np.ndarray]:
    """L2-normalised image embeddings, one (K_i, D) float32 array per (K_i, H, W, 3) stack.

    Stacks may differ in size (clips of different videos); each is preprocessed as one batch,
    then all frames go through the image tower together in chunks of `batch_size`.
    """
    if not stacks:
        return []
    pixels = torch.cat([preprocess(s) for s in stacks if len(s)], dim=0)  # (sum K, 3, S, S)
    chunks = [
        model.encode_image(pixels[i : i + batch_size], normalize=True)
        for i in range(0, pixels.shape[0], batch_size)
    ]
    embeddings = torch.cat(chunks).float().cpu().numpy() if chunks else np.zeros((0, 0), np.float32)
    out, start = [], 0
    for s in stacks:
        out.append(embeddings[start : start + len(s)])
        start += len(s)
    return out


@torch.inference_mode()
def encode_texts(model: torch.nn.Module, tokenizer: Any, texts: list[str]) -> np.ndarray:
    """L2-normalised text embeddings (N, D) float32."""
    device = next(model.parameters()).device
    tokens = tokenizer(texts).to(device)
    return model.encode_text(tokens, normalize=True).float().cpu().numpy()


def logit_scale_of(model: torch.nn.Module) -> float:
    """CLIP's learned softmax temperature (exp of the stored log value), as a float."""
    return float(model.logit_scale.exp().item())


def encode_clips(
    model: torch.nn.Module,
    preprocess: FramePreprocessor,
    clips: list[Any],
    num_frames: int,
    batch_size: int,
) -> list[np.ndarray]:
    """One (K, D) array of L2-normalised frame embeddings per clip, from `num_frames` of its
    shared sampled frames (evenly spread; 0 = all). A clip without frames gives (0, D)."""
    stacks = [c.frames[even_frame_indices(len(c.frames), num_frames)] for c in clips]
    return encode_frame_stacks(model, preprocess, stacks, batch_size)
