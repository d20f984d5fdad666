"""Flow matching objective, frame replacement, condition dropout and MaskDiT token masks.

Conventions (fixed once, tested in tests/model/test_model_flow.py):
- t in [0, 1]; t = 0 is pure noise, t = 1 is data.
- x_t = t * x1 + (1 - t) * eps; the velocity target is v = dx_t/dt = x1 - eps.
- The loss is the mean squared error between the model's velocity (after the clean-sample
  conversion when `cfg.predict_clean`) and v, averaged over the elements that count: frames that
  were replaced by clean latents are excluded, and under MaskDiT only the visible (kept) spatial
  tokens count (MaskDiT's loss; its optional masked-token reconstruction loss is not used).
- Frame replacement: the given frames of x_t are overwritten with the clean latents (same in
  training and sampling). Given frames are a (B, T) bool mask over latent frames, so TI2V (frame
  0), prediction (frames 0..k-1), interpolation (first and last) are all the same mechanism.
- Condition dropout: text is replaced by the *encoded empty prompt* (passed in by the caller)
  with p = 0.1; independently the image condition is dropped with p = 0.08, which clears all given
  frames of that sample so they stay noised like the others (plain T2V).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------- timesteps


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift, in our convention (t = 0 noise): the noise level s = 1 - t becomes
    `shift * s / (1 + (shift - 1) * s)`. `shift > 1` moves time towards the noise end, where a
    video's layout and motion are decided; video models shift far more than image models (many
    latent elements per token reveal structure at higher noise). `shift = 1` is the identity."""
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    if shift == 1.0:
        return t
    s = 1.0 - t
    return 1.0 - shift * s / (1.0 + (shift - 1.0) * s)


def sample_timesteps(
    batch: int,
    *,
    kind: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(batch,) fp32 times in [0, 1]. "uniform", or "logit_normal": sigmoid(N(mean, std))
    (SD3's sampler; a positive `mean` puts more weight near the data end t = 1); then
    `shift_time(t, shift)`."""
    gdev = generator.device if generator is not None else device
    if kind == "uniform":
        t = torch.rand(batch, generator=generator, device=gdev)
    elif kind == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=gdev))
    else:
        raise ValueError(f"unknown timestep sampler {kind!r} (uniform | logit_normal)")
    t = shift_time(t, shift)
    return t.to(device) if device is not None else t


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x1: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t * x1 + (1 - t) * eps."""
    tb = _bcast(t, x1)
    return tb * x1 + (1 - tb) * eps


def velocity_target(x1: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return x1 - eps


# ---------------------------------------------------------------------------- frame replacement


def replace_frames(
    x_t: torch.Tensor, clean: torch.Tensor, given_frames: torch.Tensor | None
) -> torch.Tensor:
    """Overwrite the given frames of x_t (B, C, T, H, W) with `clean` (bit-exact copy).

    `given_frames`: (B, T) bool, True = replaced by the clean latent. None = nothing given."""
    if given_frames is None:
        return x_t
    m = given_frames.bool()[:, None, :, None, None]
    return torch.where(m, clean.to(x_t.dtype), x_t)


def first_frames_mask(batch: int, frames: int, k: int = 1, device=None) -> torch.Tensor:
    """(B, T) bool with the first k frames given (k=1: TI2V; k>1: video prediction)."""
    m = torch.zeros(batch, frames, dtype=torch.bool, device=device)
    m[:, :k] = True
    return m


def endpoints_mask(batch: int, frames: int, device=None) -> torch.Tensor:
    """(B, T) bool with the first and last frames given (interpolation)."""
    m = torch.zeros(batch, frames, dtype=torch.bool, device=device)
    m[:, 0] = True
    m[:, -1] = True
    return m


# ---------------------------------------------------------------------------- MaskDiT


def random_spatial_mask(
    batch: int,
    num_tokens: int,
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Indices (B, K) of the spatial tokens to KEEP (sorted), K = round(N * (1 - ratio)).

    The same indices are used in every frame (`STIV.forward(..., token_keep=...)`). `num_tokens`
    is Ht * Wt (latent H/p * W/p). Ratio 0 gives all indices in order."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = max(1, round(num_tokens * (1.0 - mask_ratio)))
    gdev = generator.device if generator is not None else device
    noise = torch.rand(batch, num_tokens, generator=generator, device=gdev)
    idx = noise.argsort(dim=1)[:, :keep].sort(dim=1).values
    return idx.to(device) if device is not None else idx


def visible_latent_mask(
    token_keep: torch.Tensor, grid_hw: tuple[int, int], patch_size: int
) -> torch.Tensor:
    """Kept token indices (B, K) -> (B, 1, 1, H, W) float mask over latent pixels (1 = visible)."""
    ht, wt = grid_hw
    b = token_keep.shape[0]
    m = torch.zeros(b, ht * wt, device=token_keep.device)
    m.scatter_(1, token_keep, 1.0)
    m = m.view(b, 1, 1, ht, 1, wt, 1).expand(b, 1, 1, ht, patch_size, wt, patch_size)
    return m.reshape(b, 1, 1, ht * patch_size, wt * patch_size)


# ---------------------------------------------------------------------------- the loss


def flow_matching_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    given_frames: torch.Tensor | None = None,
    token_keep: torch.Tensor | None = None,
    patch_size: int = 2,
) -> torch.Tensor:
    """Masked MSE between the predicted and target velocity (B, C, T, H, W), in fp32.

    Averaged over the elements that count: not in a given (replaced) frame, and, with
    `token_keep`, inside a visible spatial token. Elements that don't count get exactly zero
    gradient."""
    err = (pred.float() - target.float()).pow(2)
    b, c, t, h, w = err.shape
    weight = torch.ones(b, 1, t, 1, 1, device=err.device)
    if given_frames is not None:
        weight = weight * (~given_frames.bool()).float()[:, None, :, None, None]
    if token_keep is not None:
        weight = weight * visible_latent_mask(
            token_keep, (h // patch_size, w // patch_size), patch_size
        )
    weight = weight.expand(b, 1, t, h, w)
    denom = (weight.sum() * c).clamp(min=1.0)
    return (err * weight).sum() / denom


# ---------------------------------------------------------------------------- condition dropout


class DroppedConditions(NamedTuple):
    text_tokens: torch.Tensor
    text_mask: torch.Tensor
    text_pooled: torch.Tensor
    given_frames: torch.Tensor | None
    text_dropped: torch.Tensor  # (B,) bool
    image_dropped: torch.Tensor  # (B,) bool


def expand_null_condition(
    null: torch.Tensor, batch: int, like: torch.Tensor, fill=0, pad_tokens: bool = True
) -> torch.Tensor:
    """Broadcast the empty-prompt encoding to the batch and pad it to like's token length."""
    null = null.to(device=like.device, dtype=like.dtype)
    if null.dim() == like.dim() - 1:
        null = null[None]
    if pad_tokens and null.shape[1] != like.shape[1]:
        extra = like.shape[1] - null.shape[1]
        if extra < 0:
            raise ValueError(f"empty prompt has {null.shape[1]} tokens, batch has {like.shape[1]}")
        pad = [0, 0] * (null.dim() - 2) + [0, extra]
        null = F.pad(null, pad, value=fill)
    return null.expand(batch, *like.shape[1:])


def apply_condition_dropout(
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    text_pooled: torch.Tensor,
    given_frames: torch.Tensor | None,
    *,
    null_text_tokens: torch.Tensor,
    null_text_mask: torch.Tensor,
    null_text_pooled: torch.Tensor,
    p_text: float = 0.1,
    p_image: float = 0.08,
    generator: torch.Generator | None = None,
) -> DroppedConditions:
    """Independently drop the text (-> encoded empty prompt) and the image condition (-> no
    given frames: they stay noised). Null tensors may be unbatched ((L, D), (L,), (D,))."""
    b = text_tokens.shape[0]
    gdev = generator.device if generator is not None else text_tokens.device
    u = torch.rand(2, b, generator=generator, device=gdev).to(text_tokens.device)
    drop_t, drop_i = u[0] < p_text, u[1] < p_image
    nt = expand_null_condition(null_text_tokens, b, text_tokens)
    nm = expand_null_condition(null_text_mask.bool(), b, text_mask.bool(), fill=False)
    npool = expand_null_condition(null_text_pooled, b, text_pooled, pad_tokens=False)
    tokens = torch.where(drop_t[:, None, None], nt, text_tokens)
    mask = torch.where(drop_t[:, None], nm, text_mask.bool())
    pooled = torch.where(drop_t[:, None], npool, text_pooled)
    if given_frames is not None:
        given_frames = given_frames.bool() & ~drop_i[:, None]
    return DroppedConditions(tokens, mask, pooled, given_frames, drop_t, drop_i)


# ---------------------------------------------------------------------------- one training loss


def model_config(model):
    """The `STIVConfig` of an `STIV`, also through DDP / DeepSpeed (`.module`) and
    `torch.compile` (`._orig_mod`) wrappers."""
    for _ in range(4):
        cfg = getattr(model, "cfg", None)
        if cfg is not None:
            return cfg
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if model is None:
            break
    raise AttributeError("model has no STIVConfig (.cfg), also not behind .module / ._orig_mod")


def training_loss(
    model,
    x1: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    text_pooled: torch.Tensor,
    micro_cond: torch.Tensor,
    *,
    given_frames: torch.Tensor | None = None,
    null_text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    p_text: float = 0.1,
    p_image: float = 0.08,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    timestep_sampler: str = "logit_normal",
    mask_ratio: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """Full flow-matching step for `model` (an `STIV`, possibly wrapped by DDP / DeepSpeed /
    torch.compile): dropout -> t, eps -> x_t -> frame
    replacement -> MaskDiT keep-mask -> velocity -> masked loss.

    `null_text = (tokens, mask, pooled)` of the encoded empty prompt enables condition dropout.
    `mask_ratio` defaults to `model.cfg.mask_ratio` while training (0 in eval mode). Drawn times
    use the model's `cfg.timestep_shift`."""
    b = x1.shape[0]
    x1 = x1.float()
    text_dropped = image_dropped = torch.zeros(b, dtype=torch.bool, device=x1.device)
    if null_text is not None:
        d = apply_condition_dropout(
            text_tokens, text_mask, text_pooled, given_frames,
            null_text_tokens=null_text[0], null_text_mask=null_text[1], null_text_pooled=null_text[2],
            p_text=p_text, p_image=p_image, generator=generator,
        )  # fmt: skip
        text_tokens, text_mask, text_pooled, given_frames = d[:4]
        text_dropped, image_dropped = d.text_dropped, d.image_dropped
    gdev = generator.device if generator is not None else x1.device
    cfg = model_config(model)
    if t is None:
        t = sample_timesteps(
            b, kind=timestep_sampler, shift=cfg.timestep_shift, generator=generator, device=gdev
        )
    t = t.to(x1.device).float()
    if noise is None:
        noise = torch.randn(x1.shape, generator=generator, device=gdev)
    noise = noise.to(x1.device).float()
    x_t = replace_frames(interpolate(x1, noise, t), x1, given_frames)
    target = velocity_target(x1, noise)

    ratio = (cfg.mask_ratio if model.training else 0.0) if mask_ratio is None else mask_ratio
    token_keep = None
    if ratio > 0:
        n = (x1.shape[-2] // cfg.patch_size) * (x1.shape[-1] // cfg.patch_size)
        token_keep = random_spatial_mask(b, n, ratio, generator=generator, device=x1.device)
    pred = model(x_t, t, text_tokens, text_mask, text_pooled, micro_cond, token_keep=token_keep)
    loss = flow_matching_loss(pred, target, given_frames, token_keep, cfg.patch_size)
    aux = {
        "t": t,
        "token_keep": token_keep,
        "given_frames": given_frames,
        "text_dropped": text_dropped,
        "image_dropped": image_dropped,
    }
    return loss, aux
