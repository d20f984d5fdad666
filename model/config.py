"""STIV model configuration and presets.

`STIVConfig` is the single source of truth for the network's shape. It is a plain dataclass
(validated in `__post_init__`) that round-trips through `to_dict()` / `from_dict()` so it can be
stored in checkpoints and YAML.

Paper presets (STIV Table 1, dimensions used exactly, MLP ratio 4):

    stiv-xl    28 blocks, hidden 1152, 18 heads   (paper: about 600M parameters)
    stiv-xxl   38 blocks, hidden 1536, 24 heads   (paper: about 1.5B)
    stiv-m     46 blocks, hidden 3072, 48 heads   (paper: about 8.7B)

`num_blocks` is Table 1's block count, and it *includes* MaskDiT's `num_extra_unmasked_blocks`
(2): the last two blocks are the "two extra DiT blocks" that run on all tokens after the masked
ones are restored. Our choice, made on the counts: with the two blocks inside the 28 / 38 / 46,
the counts land 2.6% / 2.0% / 1.3% from the paper's 600M / 1.5B / 8.7B (see model/info.py); on
top of them, 9.6% / 3.0% / 5.6%. The blocks are always present, also when training or sampling
unmasked, so masked and unmasked stages share one architecture.

The paper's defaults for the public baseline are used for the VAE / text encoder dims of the
paper presets: `sd-vae-ft-ema` latents (4 channels, 8x down) and CLIP L/14 text (768 dims, 77
tokens). The final STIV model used an 8-channel VAE and a 1280-dim text encoder: override
`in_channels` / `text_dim` (both are pluggable; they change the count by well under 1%).

Units of the RoPE base sizes: `rope_base_grid` is the (height, width) in *tokens* (after the
spatial patch) and `rope_base_frames` the number of *temporal tokens* (after the temporal patch)
that the model was trained at. Larger grids / longer clips get interpolated positions (positions
scaled into the base range, Chen et al. 2023); smaller ones use integer positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MICRO_COND_NAMES = (
    "orig_height",  # pixels
    "orig_width",  # pixels
    "crop_top",  # pixels
    "crop_left",  # pixels
    "crop_height",  # pixels
    "crop_width",  # pixels
    "frame_stride",  # frames (1 for images)
)
NUM_MICRO_CONDS = len(MICRO_COND_NAMES)


@dataclass
class STIVConfig:
    num_blocks: int
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    in_channels: int = 4
    patch_size: int = 2
    temporal_patch_size: int = 2  # 2 for video; 1 for an image-only (T2I) model
    text_dim: int = 768
    max_text_tokens: int = 77
    mask_ratio: float = 0.0  # MaskDiT ratio used by training helpers; 0.0 = unmasked
    num_extra_unmasked_blocks: int = 2  # MaskDiT "decoder": extra blocks on all tokens
    predict_clean: bool = False  # network predicts x1, converted to velocity (docs/design-notes.md "A tiny video DiT on 2 CPU cores")
    grad_checkpointing: bool = False  # keep only self-attention outputs (STIV sec. 2.2)
    temporal_attention: bool = True  # False: no temporal parameters at all (pure T2I model)
    # Initial value of the per-channel temporal gates. The recipe's 0.0 makes a fresh temporal
    # branch a no-op (T2V starts as its T2I parent). Tiny CPU runs use 1.0: with a zero gate the
    # branch gets no gradient until the gate grows, and in a few thousand steps it never did
    # (docs/design-notes.md "Growing T2I into T2V"; docs/train-demo.md "What made direction learnable").
    temporal_gate_init: float = 0.0
    # Also add fixed 3D sin-cos absolute positions (time, row, column) to the patch tokens, as
    # DiT did before RoPE. RoPE alone is relative: from pure noise the network cannot place the
    # prompted motion's start and end in the frame, and the tiny CPU model never learned
    # direction without them (docs/train-demo.md "What made direction learnable"). Off for the paper presets (RoPE only).
    abs_pos_embed: bool = False
    # Feed the pooled text vector into the singleton condition (AdaLN), as STIV does. Off for the
    # tiny CPU preset: its text encoder is random, so the pooled vector is a hash of the whole
    # caption and a held-out caption gets an unseen one; the tiny model leant on it for colour and
    # direction and lost the given frame's colour on held-out TI2V prompts (docs/train-demo.md "What made TI2V keep the given colour").
    # Without it the text reaches the network only through cross-attention over the tokens.
    text_pooled: bool = True
    rope_base_grid: tuple[int, int] = (16, 16)  # tokens: 256 px / 8 (VAE) / 2 (patch)
    rope_base_frames: int = 10  # temporal tokens: 20 latent frames / 2
    rope_theta: float = 10000.0
    qk_norm: bool = True
    frequency_embedding_size: int = 256  # sinusoidal width per scalar
    timestep_scale: float = 1000.0  # t in [0,1] is scaled before the sinusoidal embedding
    norm_eps: float = 1e-6
    clean_pred_min_denominator: float = 0.05  # v = (x_hat - x_t) / max(1 - t, this)
    # SD3 time shift (model.flow.shift_time) the model trains with and samples with by default:
    # > 1 spends more of both at high noise, where a video's layout and motion are decided.
    timestep_shift: float = 1.0
    name: str = ""

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        # YAML / JSON give lists: normalise.
        self.rope_base_grid = tuple(int(v) for v in self.rope_base_grid)  # type: ignore[assignment]
        errors: list[str] = []

        def pos_int(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                errors.append(f"{name} must be a positive int, got {v!r}")

        for n in (
            "num_blocks",
            "hidden_size",
            "num_heads",
            "in_channels",
            "patch_size",
            "temporal_patch_size",
            "text_dim",
            "max_text_tokens",
            "rope_base_frames",
            "frequency_embedding_size",
        ):
            pos_int(n)
        if (
            not isinstance(self.num_extra_unmasked_blocks, int)
            or self.num_extra_unmasked_blocks < 0
        ):
            errors.append("num_extra_unmasked_blocks must be an int >= 0")
        elif isinstance(self.num_blocks, int) and self.num_extra_unmasked_blocks >= self.num_blocks:
            errors.append("num_extra_unmasked_blocks must be < num_blocks (they are part of it)")
        if not errors:
            if self.hidden_size % self.num_heads:
                errors.append(
                    f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}"
                )
            elif (self.hidden_size // self.num_heads) % 4:
                # 2D RoPE gives each spatial axis half the head dim, rotated in pairs.
                errors.append(
                    f"head dim {self.hidden_size // self.num_heads} must be a multiple of 4"
                )
            if self.frequency_embedding_size % 2:
                errors.append("frequency_embedding_size must be even")
        if not (self.mlp_ratio > 0):
            errors.append(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not (0.0 <= float(self.mask_ratio) < 1.0):
            errors.append(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.mask_ratio > 0 and self.num_extra_unmasked_blocks == 0:
            errors.append("MaskDiT (mask_ratio > 0) needs num_extra_unmasked_blocks >= 1")
        if len(self.rope_base_grid) != 2 or min(self.rope_base_grid) <= 0:
            errors.append(f"rope_base_grid must be two positive ints, got {self.rope_base_grid}")
        if not (self.rope_theta > 0):
            errors.append("rope_theta must be > 0")
        if not isinstance(self.temporal_gate_init, (int, float)) or isinstance(
            self.temporal_gate_init, bool
        ):
            errors.append(f"temporal_gate_init must be a number, got {self.temporal_gate_init!r}")
        if not (isinstance(self.timestep_shift, (int, float)) and self.timestep_shift > 0):
            errors.append(f"timestep_shift must be a number > 0, got {self.timestep_shift!r}")
        if not (0 < self.clean_pred_min_denominator <= 1):
            errors.append("clean_pred_min_denominator must be in (0, 1]")
        for n in (
            "predict_clean",
            "grad_checkpointing",
            "temporal_attention",
            "qk_norm",
            "abs_pos_embed",
            "text_pooled",
        ):
            if not isinstance(getattr(self, n), bool):
                errors.append(f"{n} must be a bool")
        if errors:
            raise ValueError("invalid STIVConfig: " + "; ".join(errors))

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def num_masked_blocks(self) -> int:
        """Blocks that see only the kept tokens under MaskDiT (all tokens when unmasked)."""
        return self.num_blocks - self.num_extra_unmasked_blocks

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_base_grid"] = list(self.rope_base_grid)  # YAML/JSON friendly
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> STIVConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown STIVConfig fields: {unknown}")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> STIVConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, STIVConfig] = {
    # --- STIV Table 1 (exact dimensions) ---
    "stiv-xl": STIVConfig(num_blocks=28, hidden_size=1152, num_heads=18, name="stiv-xl"),
    "stiv-xxl": STIVConfig(num_blocks=38, hidden_size=1536, num_heads=24, name="stiv-xxl"),
    "stiv-m": STIVConfig(num_blocks=46, hidden_size=3072, num_heads=48, name="stiv-m"),
    # --- tiny presets (ours) ---
    # unit tests: a few thousand parameters per block, runs in milliseconds on CPU.
    "stiv-tiny": STIVConfig(
        num_blocks=3,
        hidden_size=32,
        num_heads=2,
        in_channels=4,
        text_dim=16,
        max_text_tokens=8,
        num_extra_unmasked_blocks=1,
        rope_base_grid=(4, 4),
        rope_base_frames=4,
        frequency_embedding_size=32,
        name="stiv-tiny",
    ),
    # CPU training demos (docs/design-notes.md "A tiny video DiT on 2 CPU cores"): pixel-space latents such as 32x32 RGB
    # with 4x4 space-to-depth = 12 channels at 8x8; predict the clean sample.
    "stiv-tiny-cpu": STIVConfig(
        num_blocks=6,
        hidden_size=160,
        num_heads=4,
        in_channels=12,
        text_dim=128,
        max_text_tokens=16,
        num_extra_unmasked_blocks=2,
        predict_clean=True,
        abs_pos_embed=True,  # without it direction stayed at chance (docs/train-demo.md "What made direction learnable")
        text_pooled=False,  # a random text encoder's pooled vector does not compose (above)
        rope_base_grid=(4, 4),
        rope_base_frames=4,
        frequency_embedding_size=128,
        name="stiv-tiny-cpu",
    ),
    # bench/model_step.py: deep (12 masked + 2 unmasked blocks), narrow enough for a 2-core CPU.
    "stiv-bench-cpu": STIVConfig(
        num_blocks=14,
        hidden_size=128,
        num_heads=4,
        in_channels=4,
        text_dim=64,
        max_text_tokens=16,
        num_extra_unmasked_blocks=2,
        rope_base_grid=(16, 16),
        rope_base_frames=4,
        frequency_embedding_size=128,
        name="stiv-bench-cpu",
    ),
}

# Approximate parameter counts quoted by the paper (Table 1).
PAPER_PARAMETERS: dict[str, float] = {"stiv-xl": 600e6, "stiv-xxl": 1.5e9, "stiv-m": 8.7e9}


def get_preset(name: str, **overrides: Any) -> STIVConfig:
    """Return a fresh copy of preset `name` with `overrides` applied (and validated)."""
    if name not in PRESETS:
        raise KeyError(f"unknown STIV preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
