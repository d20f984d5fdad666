"""Progressive initialisation: T2I -> T2V inflation and the "both" initialisation.

- `init_video_from_image(video, image_sd)`: every weight but temporal attention comes from the
  T2I model. The (1, p, p) patch embedding is inflated to (pt, p, p) by repeating it along time
  and dividing by pt, and the final projection (p*p*C outputs) is repeated for each of the pt
  temporal sub-positions. A video made of one repeated image therefore gets, in every temporal
  token, exactly the T2I token, and every output frame equals the T2I output. The temporal
  branch keeps the video model's fresh weights and its per-channel gates are set to exactly zero
  (docs/design-notes.md "Growing T2I into T2V": a zero output projection would not survive the stateless post-norm).
- `init_both(video, spatial_sd, temporal_sd)`: everything but temporal attention from
  `spatial_sd` (e.g. the high-resolution T2I model; inflated if it is an image model), temporal
  attention from `temporal_sd` (e.g. the low-resolution T2V model).

Both accept the target as an `nn.Module` (loaded in place, strict) or a state dict (a new state
dict is returned in the report under "state_dict") and sources as modules or state dicts. Keys
of compiled / DDP-wrapped models (`_orig_mod.`, `module.` prefixes) are normalised.

RoPE has no weights: position interpolation is configured, not loaded. A grown model (larger
grid or longer clips) should keep its parent's `rope_base_grid` / `rope_base_frames`
(`inherit_rope_base`), so its positions are squeezed into the range the parent learned.

Each function returns a dict of key lists: "copied", "inflated", "new" (kept from the target's
own initialisation), "ignored" (source keys not used), and for `init_both` "temporal" (copied
from `temporal_sd`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .config import STIVConfig

_PREFIXES = ("_orig_mod.", "module.")


def is_temporal_key(key: str) -> bool:
    """Parameters of the temporal attention branch (attention weights and the gate)."""
    return ".temporal." in f".{key}"


def _clean(sd: Mapping[str, torch.Tensor] | nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(sd, nn.Module):
        sd = sd.state_dict()
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


def _inflate(key: str, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor | None:
    """Image-model tensor -> video-model tensor, or None if `key` is not inflatable."""
    if key == "patch_embed.proj.weight" and src.dim() == 5 and src.shape[2] == 1:
        pt = dst.shape[2]
        if src.shape[:2] + src.shape[3:] == dst.shape[:2] + dst.shape[3:]:
            return src.repeat(1, 1, pt, 1, 1) / pt
    if (
        key in ("final_layer.linear.weight", "final_layer.linear.bias")
        and dst.shape[0] % src.shape[0] == 0
    ):
        pt = dst.shape[0] // src.shape[0]
        if src.shape[1:] == dst.shape[1:]:
            # output layout is (pt, p, p, C) with pt outermost: repeat the image head per sub-frame
            return src.repeat(pt, *([1] * (src.dim() - 1)))
    return None


def _merge_spatial(
    target: dict[str, torch.Tensor], source: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    new_sd: dict[str, torch.Tensor] = {}
    report: dict[str, list[str]] = {"copied": [], "inflated": [], "new": [], "ignored": []}
    for k, dst in target.items():
        if is_temporal_key(k) or k not in source:
            new_sd[k] = dst
            report["new"].append(k)
            continue
        src = source[k]
        if src.shape == dst.shape:
            new_sd[k] = src.detach().to(dtype=dst.dtype, device=dst.device).clone()
            report["copied"].append(k)
            continue
        inflated = _inflate(k, src.detach(), dst)
        if inflated is None:
            raise ValueError(
                f"shape mismatch for {k}: source {tuple(src.shape)} vs target {tuple(dst.shape)}"
            )
        new_sd[k] = inflated.to(dtype=dst.dtype, device=dst.device)
        report["inflated"].append(k)
    report["ignored"] = sorted(k for k in source if k not in target or is_temporal_key(k))
    return new_sd, report


def _set_gates(sd: dict[str, torch.Tensor], value: float = 0.0) -> None:
    for k in sd:
        if is_temporal_key(k) and k.endswith("temporal.gate"):
            sd[k] = torch.full_like(sd[k], float(value))


def _finish(target, new_sd: dict[str, torch.Tensor], report: dict) -> dict:
    if isinstance(target, nn.Module):
        # load into the (possibly compiled) module with its own key names
        own = list(target.state_dict().keys())
        cleaned = list(_clean(target).keys())
        target.load_state_dict({o: new_sd[c] for o, c in zip(own, cleaned)}, strict=True)
    else:
        report["state_dict"] = new_sd
    return report


def init_video_from_image(
    video: nn.Module | Mapping[str, torch.Tensor],
    image: nn.Module | Mapping[str, torch.Tensor],
) -> dict:
    """T2I -> T2V: load all but temporal attention from `image`, inflating the patch embedding
    and the output head; temporal gates start at the video model's `temporal_gate_init` (a bare
    state dict: exactly zero)."""
    target = _clean(video)
    new_sd, report = _merge_spatial(target, _clean(image))
    cfg = getattr(video, "cfg", None)
    _set_gates(new_sd, cfg.temporal_gate_init if cfg is not None else 0.0)
    return _finish(video, new_sd, report)


def init_both(
    video: nn.Module | Mapping[str, torch.Tensor],
    spatial: nn.Module | Mapping[str, torch.Tensor],
    temporal: nn.Module | Mapping[str, torch.Tensor],
) -> dict:
    """Everything but temporal attention from `spatial`, temporal attention from `temporal`."""
    target = _clean(video)
    new_sd, report = _merge_spatial(target, _clean(spatial))
    tsrc = _clean(temporal)
    report["temporal"] = []
    for k in [k for k in target if is_temporal_key(k)]:
        if k not in tsrc:
            raise KeyError(f"temporal source has no {k}")
        if tsrc[k].shape != target[k].shape:
            raise ValueError(
                f"shape mismatch for {k}: {tuple(tsrc[k].shape)} vs {tuple(target[k].shape)}"
            )
        new_sd[k] = tsrc[k].detach().to(dtype=target[k].dtype, device=target[k].device).clone()
        report["temporal"].append(k)
        report["new"].remove(k)
    return _finish(video, new_sd, report)


def inherit_rope_base(child: STIVConfig, parent: STIVConfig) -> STIVConfig:
    """Child config with the parent's RoPE base sizes (positions interpolated when it grows)."""
    return child.replace(
        rope_base_grid=parent.rope_base_grid, rope_base_frames=parent.rope_base_frames
    )
