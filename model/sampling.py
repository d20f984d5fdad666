"""ODE sampling with JIT-CFG, CFG renormalisation and frame replacement.

The paper says "reverse-time SDE"; we integrate the flow-matching probability-flow ODE
dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data) with Euler or Heun (2nd order, trapezoidal
predictor-corrector) on a uniform grid of `steps` intervals. Heun costs two guided evaluations
per step.

At every evaluation:
- conditional input: the given frames hold the clean latents (frame replacement);
- unconditional input (text -> encoded empty prompt, image dropped together): the given frames
  hold the given latents noised to the current level, `t * x_img + (1 - t) * eps0`, i.e. what
  image-dropped training showed at time t (our choice; the paper does not say). `eps0` is the
  sample's initial noise at those frames, so the noise is fixed along the trajectory;
- both passes run as one batch of 2B (JIT-CFG), then
  `F = F_u + s * (F_c - F_u)` and, with renormalisation, `F <- ||F_c|| * F / ||F||` (per sample,
  L2 over all elements of the frames that are generated; given frames are excluded from both
  norms since their velocity is discarded);
- after each update the given frames are re-imposed (bit-exact copies).

Reproducibility: the initial noise comes from a CPU `torch.Generator` seeded with `seed`, so the
same seed gives the same noise on any device.
"""

from __future__ import annotations

import itertools

import torch

from .flow import expand_null_condition, interpolate, model_config, replace_frames, shift_time


def cfg_combine(
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor,
    scale: float,
    renorm: bool = True,
    weight: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Classifier-free guidance with optional renormalisation to the conditional norm.

    `weight`: optional 0/1 mask broadcastable to v (B, C, T, H, W) selecting the elements the
    norms are taken over (e.g. the non-given frames)."""
    v = v_uncond + scale * (v_cond - v_uncond)
    if renorm:
        w = torch.ones_like(v_cond[:, :1, :, :1, :1]) if weight is None else weight.to(v.dtype)
        dims = tuple(range(1, v.dim()))
        n_cond = (v_cond.pow(2) * w).sum(dims, keepdim=True).sqrt()
        n_guid = (v.pow(2) * w).sum(dims, keepdim=True).sqrt()
        v = v * (n_cond / n_guid.clamp(min=eps))
    return v


@torch.no_grad()
def sample(
    model,
    *,
    shape: tuple[int, int, int, int, int],
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    text_pooled: torch.Tensor,
    null_text_tokens: torch.Tensor,
    null_text_mask: torch.Tensor,
    null_text_pooled: torch.Tensor,
    micro_cond: torch.Tensor,
    given_latents: torch.Tensor | None = None,
    given_mask: torch.Tensor | None = None,
    cfg_scale: float | None = 7.5,
    renorm: bool = True,
    steps: int = 50,
    solver: str = "euler",
    seed: int = 0,
    shift: float | None = None,
) -> torch.Tensor:
    """Generate latents (B, C, T, H, W) in fp32.

    `given_latents` (B, C, T, H, W) and `given_mask` (B, T) bool: frames to keep fixed (TI2V:
    frame 0; prediction: first k; interpolation: first and last). `cfg_scale=None` runs the
    conditional model only (one pass). Null text tensors may be unbatched and shorter than the
    conditional text (they are padded with masked positions). `shift` warps the time grid
    towards the noise end (`flow.shift_time`); None uses the model's `cfg.timestep_shift`, the
    shift it was trained with."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"unknown solver {solver!r} (euler | heun)")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if (given_latents is None) != (given_mask is None):
        raise ValueError("given_latents and given_mask go together")
    param = next(model.parameters())
    device = param.device
    b = shape[0]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    eps0 = torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device)

    given: torch.Tensor | None = None
    clean = eps0  # the kept frames' latents; read only where `given` is True
    if given_mask is not None and given_latents is not None:
        given = given_mask.to(device).bool()
        clean = given_latents.to(device=device, dtype=torch.float32)
        if given.shape != (b, shape[2]) or clean.shape != tuple(shape):
            raise ValueError("given_mask must be (B, T) and given_latents (B, C, T, H, W)")
        keep_w = (~given).float()[:, None, :, None, None]
    else:
        keep_w = None

    text_tokens, text_pooled = text_tokens.to(device), text_pooled.to(device)
    text_mask, micro_cond = text_mask.to(device).bool(), micro_cond.to(device)
    if cfg_scale is not None:
        nt = expand_null_condition(null_text_tokens, b, text_tokens)
        nm = expand_null_condition(null_text_mask.bool(), b, text_mask, fill=False)
        npool = expand_null_condition(null_text_pooled, b, text_pooled, pad_tokens=False)
        tokens2 = torch.cat([text_tokens, nt])
        mask2 = torch.cat([text_mask, nm])
        pooled2 = torch.cat([text_pooled, npool])
        micro2 = torch.cat([micro_cond, micro_cond])

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        tb = torch.full((b,), t, device=device, dtype=torch.float32)
        x_c = replace_frames(x, clean, given)
        if cfg_scale is None:
            return model(x_c, tb, text_tokens, text_mask, text_pooled, micro_cond).float()
        x_u = x_c
        if given is not None:
            x_u = replace_frames(x, interpolate(clean, eps0, tb), given)
        out = model(torch.cat([x_c, x_u]), torch.cat([tb, tb]), tokens2, mask2, pooled2, micro2)
        v_c, v_u = out.float().chunk(2)
        return cfg_combine(v_c, v_u, float(cfg_scale), renorm=renorm, weight=keep_w)

    was_training = model.training
    model.eval()
    try:
        if shift is None:
            shift = model_config(model).timestep_shift
        grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
        ts = shift_time(grid, shift).tolist()
        x = replace_frames(eps0, clean, given)
        for t0, t1 in itertools.pairwise(ts):
            dt = t1 - t0
            v0 = velocity(x, t0)
            if solver == "euler":
                x = x + dt * v0
            else:
                x_pred = replace_frames(x + dt * v0, clean, given)
                x = x + 0.5 * dt * (v0 + velocity(x_pred, t1))
            x = replace_frames(x, clean, given)
    finally:
        model.train(was_training)
    return x
