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
