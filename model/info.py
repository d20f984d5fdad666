"""Parameter counts for a preset, computed on the meta device (no memory is allocated).

The paper (Table 1) quotes about 600M / 1.5B / 8.7B for XL / XXL / M without saying how it
counted. With MLP ratio 4 a block holds ~16 d^2 parameters without temporal attention and
~20 d^2 with it: XL and XXL match the quoted counts without temporal attention, M matches with
it. `model_info` reports both counts and which one is closer to the paper's figure.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from .config import PAPER_PARAMETERS, STIVConfig, get_preset
from .init import is_temporal_key
from .network import STIV

_TOP = {
    "patch_embed": "patch_embed",
    "cond_embed": "condition_embedder",
    "adaln": "adaln_shared",
    "caption_proj": "caption_projection",
    "mask_token": "mask_token",
    "final_layer": "final_layer",
}
_SUB = {
    "spatial_attn": "spatial_attention",
    "temporal": "temporal_attention",
    "cross_attn": "cross_attention",
    "mlp": "mlp",
    "scale_shift_table": "adaln_offsets",
}


def _component(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blocks":
        return f"blocks.{_SUB.get(parts[2], parts[2])}"
    return _TOP.get(parts[0], parts[0])


def model_info(preset: str | STIVConfig, **overrides: Any) -> dict[str, Any]:
    """Counts for `preset` (a preset name or a config): `parameters`, `parameters_without_temporal`
    and `components` ({name: count}); for paper presets also the paper's figure and which count
    matches it."""
    cfg = (
        get_preset(preset, **overrides) if isinstance(preset, str) else preset.replace(**overrides)
    )
    with torch.device("meta"):
        model = STIV(cfg)
    components: dict[str, int] = defaultdict(int)
    total = temporal = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        temporal += n if is_temporal_key(name) else 0
        components[_component(name)] += n
    info: dict[str, Any] = {
        "preset": cfg.name or None,
        "config": cfg.to_dict(),
        "parameters": total,
        "parameters_without_temporal": total - temporal,
        "components": dict(sorted(components.items())),
        "blocks": cfg.num_blocks,
        "masked_blocks": cfg.num_masked_blocks,
        "unmasked_tail_blocks": cfg.num_extra_unmasked_blocks,
    }
    paper = PAPER_PARAMETERS.get(cfg.name)
    if paper is not None:
        errs = {
            "parameters": total / paper - 1.0,
            "parameters_without_temporal": (total - temporal) / paper - 1.0,
        }
        best = min(errs, key=lambda k: abs(errs[k]))
        info["paper_parameters"] = int(paper)
        info["paper_relative_error"] = errs
        info["paper_matches"] = best
    return info


def _saved_bytes(
    cfg: STIVConfig, latent_shape: tuple[int, ...], text_len: int, batch: int, device: str
) -> tuple[int, int]:
    """(bytes of the tensors autograd saves in one training forward of `cfg`, of those the
    first block saves), weights excluded (meta: every saved tensor in full; a real device:
    each saved storage once)."""
    c, t, h, w = latent_shape
    with torch.device(device):
        model = STIV(cfg).train()
        x = torch.zeros(batch, c, t, h, w)
        timestep = torch.full((batch,), 0.5)
        tokens = torch.zeros(batch, text_len, cfg.text_dim)
        mask = torch.ones(batch, text_len, dtype=torch.bool)
        pooled = torch.zeros(batch, cfg.text_dim)
        micro = torch.zeros(batch, 7)
        n = (h // cfg.patch_size) * (w // cfg.patch_size)
        keep = max(1, round(n * (1.0 - cfg.mask_ratio)))
        token_keep = torch.arange(keep).expand(batch, keep) if cfg.mask_ratio > 0 else None
    params = {id(p) for p in model.parameters()}
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()} - {0}
    meta = torch.device(device).type == "meta"
    seen: dict[int, int] = {}

    def pack(saved: torch.Tensor) -> torch.Tensor:
        if id(saved) in params:
            return saved
        if meta:
            seen[id(saved)] = saved.numel() * saved.element_size()
        elif saved.untyped_storage().data_ptr() not in param_ptrs:
            seen[saved.untyped_storage().data_ptr()] = saved.untyped_storage().nbytes()
        return saved

    marks: list[int] = []
    first = model.blocks[0]
    first.register_forward_pre_hook(lambda *_: marks.append(sum(seen.values())))
    first.register_forward_hook(lambda *_: marks.append(sum(seen.values())))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        model(x, timestep, tokens, mask, pooled, micro, token_keep=token_keep).square().mean()
    return sum(seen.values()), marks[1] - marks[0]


def activation_bytes(
    cfg: STIVConfig,
    latent_shape: tuple[int, int, int, int],
    text_len: int,
    batch: int = 1,
    device: str = "meta",
    element_bytes: int = 4,
) -> dict[str, int]:
    """Activation memory of one training step: {"without_checkpointing", "with_checkpointing"}
    in bytes, for `batch` samples of `latent_shape` (C, T, h, w) under MaskDiT at
    `cfg.mask_ratio`.

    Without checkpointing: what autograd saves for backward, traced on `device`. The meta
    device allocates nothing, so a preset of any size traces in well under a second: the model
    is traced with one masked block, whose share (all blocks being alike) is extrapolated to
    `cfg.num_blocks`. On the meta device views cannot be told
    from copies, so every saved tensor counts in full (an upper bound); on a real device each
    saved storage counts once.

    With checkpointing (selective: `model.network` keeps the self-attention outputs and
    recomputes the rest): the blocks' inputs (traced), the kept spatial and temporal attention
    outputs (B * frames * tokens * d each, `element_bytes` per value), and one block's
    activations rebuilt during its backward."""

    def trace(checkpointing: bool) -> tuple[int, int]:
        small = cfg.replace(
            num_blocks=cfg.num_extra_unmasked_blocks + 1, grad_checkpointing=checkpointing
        )
        return _saved_bytes(small, latent_shape, text_len, batch, device)

    one, block = trace(False)
    without = one + (cfg.num_masked_blocks - 1) * block
    _, t, h, w = latent_shape
    frames = max(1, t // cfg.temporal_patch_size)
    n = (h // cfg.patch_size) * (w // cfg.patch_size)
    kept = max(1, round(n * (1.0 - cfg.mask_ratio)))
    per_token = cfg.hidden_size * element_bytes * batch * frames
    # A checkpointed block keeps its input tokens; the rest of its inputs are shared.
    inputs = trace(True)[0] + (cfg.num_masked_blocks - 1) * per_token * kept
    has_temporal = cfg.temporal_attention and frames > 1
    kept_outputs = (
        (1 + has_temporal)
        * per_token
        * (cfg.num_masked_blocks * kept + cfg.num_extra_unmasked_blocks * n)
    )
    return {"without_checkpointing": without, "with_checkpointing": inputs + kept_outputs + block}


def tokens_per_sample(model_cfg: STIVConfig, latent_shape: list[int]) -> int:
    """Patch tokens the network sees for one sample of latents (C, T, h, w): latent frames over
    the temporal patch (one frame is an image: one temporal token) times cells over the patch."""
    _, t, h, w = latent_shape
    return (
        max(1, t // model_cfg.temporal_patch_size)
        * (h // model_cfg.patch_size)
        * (w // model_cfg.patch_size)
    )


def flops_per_sample(model_cfg: STIVConfig, latent_shape: list[int], text_len: int) -> float:
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


def param_shapes(model_cfg: STIVConfig) -> list[tuple[int, ...]]:
    """Parameter shapes counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = STIV(model_cfg)
    return [tuple(p.shape) for p in model.parameters()]
