"""The STIV diffusion transformer (PixArt-alpha-style DiT with factorised space-time attention).

Read top to bottom: patch embedding -> singleton condition + shared AdaLN -> STIV block ->
final layer / unpatchify -> the network (MaskDiT, RoPE, gradient checkpointing).

Token layout inside the network: (B, Tt, N, D) with Tt temporal tokens and N = Ht * Wt spatial
tokens per temporal token (row-major). Spatial attention folds time into the batch, temporal
attention folds space into the batch, cross-attention sees all Tt * N tokens of a sample at once
(the text keys / values are then computed once per sample, not once per frame).

Design choices where the paper is silent (ours, documented here):
- Modulation is `x * (1 + scale) + shift` (identity at zero, as DiT / PixArt).
- Cross-attention uses the same sandwich norm `x + norm(CrossAttn(norm(x), text))` with no
  modulation and no gate (PixArt has no modulation there either).
- Temporal attention: `x + g * norm(Attn(norm(x)))` with a learned per-channel gate `g`
  initialised to zero (docs/design-notes.md "Growing T2I into T2V": a zero output projection is not enough under a stateless
  post-norm). It is skipped when there is a single temporal token (an image): attention over one
  token would only be an extra per-token linear map, which a T2I model must not learn if its
  weights are to be reused by the video model with a fresh temporal branch.
- A video model (temporal patch 2) given a single frame (an image, T == 1) embeds it with the
  patch kernel summed over time and averages the output over the temporal sub-positions. This is
  exactly what it computes for the 2-frame video made by repeating the image, and it is the
  inverse of the T2I -> T2V inflation, so an inflated model reproduces its T2I parent on images.
- MaskDiT: the same spatial positions are dropped in every frame (temporal attention stays
  aligned); the last `num_extra_unmasked_blocks` of the `num_blocks` blocks always run on all
  tokens, masked or not (see config.py for why they count inside Table 1's block count).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from functools import partial, reduce

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from .config import NUM_MICRO_CONDS, STIVConfig
from .layers import (
    Attention,
    Mlp,
    RMSNorm,
    ScalarEmbedder,
    absolute_position_embedding,
    grid_positions,
    interpolated_positions,
    modulate,
    rope_angles_1d,
    rope_angles_2d,
    rope_cos_sin,
    stateless_layer_norm,
)

# ---------------------------------------------------------------------------- patch embedding


class PatchEmbed(nn.Module):
    """(B, C, T, H, W) -> (B, Tt, Ht, Wt, D) with a (pt, p, p) Conv3d.

    T == 1 (an image) always uses temporal patch 1: the kernel summed over its time axis.
    """

    def __init__(self, cfg: STIVConfig) -> None:
        super().__init__()
        self.p, self.pt = cfg.patch_size, cfg.temporal_patch_size
        k = (self.pt, self.p, self.p)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, t, h, w = x.shape
        if h % self.p or w % self.p:
            raise ValueError(f"latent H, W ({h}, {w}) must be divisible by patch {self.p}")
        if t == 1 and self.pt > 1:
            weight = self.proj.weight.sum(dim=2, keepdim=True)
            y = nn.functional.conv3d(x, weight, self.proj.bias, stride=(1, self.p, self.p))
        else:
            if t % self.pt:
                raise ValueError(f"T = {t} frames not divisible by temporal patch {self.pt}")
            y = self.proj(x)
        return y.permute(0, 2, 3, 4, 1)


# ---------------------------------------------------------------------------- conditioning


class ConditionEmbedder(nn.Module):
    """Singleton condition: timestep + micro-conditions + pooled text.

    Each part (timestep; original size; crop box; frame stride; pooled text) is embedded
    (sinusoids + MLP, or an MLP for the text), passed through a stateless LayerNorm, and the parts
    are summed (STIV sec. 2.2). With `cfg.text_pooled` False there is no text part (and no
    parameters for it): the pooled vector is accepted and ignored.
    """

    def __init__(self, cfg: STIVConfig) -> None:
        super().__init__()
        d, f = cfg.hidden_size, cfg.frequency_embedding_size
        self.eps = cfg.norm_eps
        self.timestep = ScalarEmbedder(1, d, f, scale=cfg.timestep_scale)
        self.orig_size = ScalarEmbedder(2, d, f)  # orig_height, orig_width
        self.crop = ScalarEmbedder(4, d, f)  # crop_top, crop_left, crop_height, crop_width
        self.frame_stride = ScalarEmbedder(1, d, f)
        self.text_pooled = (
            nn.Sequential(nn.Linear(cfg.text_dim, d), nn.SiLU(), nn.Linear(d, d))
            if cfg.text_pooled
            else None
        )

    def forward(self, t: torch.Tensor, micro: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        parts = [
            self.timestep(t[:, None]),
            self.orig_size(micro[:, 0:2]),
            self.crop(micro[:, 2:6]),
            self.frame_stride(micro[:, 6:7]),
        ]
        if self.text_pooled is not None:
            parts.append(self.text_pooled(pooled.to(next(self.text_pooled.parameters()).dtype)))
        return reduce(operator.add, (stateless_layer_norm(p, self.eps) for p in parts))


# ---------------------------------------------------------------------------- the block


class TemporalAttention(nn.Module):
    """The temporal branch's attention and its per-channel gate (state-dict keys
    `temporal.attn.*`, `temporal.gate`)."""

    def __init__(self, d: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.attn = Attention(d, num_heads, qk_norm)
        self.gate = nn.Parameter(torch.zeros(d))


class STIVBlock(nn.Module):
    """Spatial self-attn (2D RoPE, AdaLN) -> temporal self-attn (1D RoPE, bidirectional, no
    AdaLN, zero-initialised gate) -> cross-attn to text (padding mask) -> MLP (AdaLN).

    Every sub-layer has the sandwich form `x + gate * norm(F(modulate(norm(x))))` with stateless
    LayerNorms. Scale / shift / gate come from the shared AdaLN (`mod`, (B, 6, D)) plus this
    block's learned offset table (PixArt's adaLN-single).
    """

    def __init__(self, cfg: STIVConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.eps = cfg.norm_eps
        self.spatial_attn = Attention(d, cfg.num_heads, cfg.qk_norm)
        self.has_temporal = cfg.temporal_attention
        if cfg.temporal_attention:
            self.temporal = TemporalAttention(d, cfg.num_heads, cfg.qk_norm)
        self.cross_attn = Attention(d, cfg.num_heads, cfg.qk_norm, cross=True)
        self.mlp = Mlp(d, cfg.mlp_hidden)
        self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d**0.5)

    def forward(
        self,
        x: torch.Tensor,  # (B, Tt, N, D)
        mod: torch.Tensor,  # (B, 6, D)
        rope_s: tuple[torch.Tensor, torch.Tensor],
        rope_t: tuple[torch.Tensor, torch.Tensor],
        ctx: torch.Tensor,  # (B, L, D)
        ctx_mask: torch.Tensor,  # (B, L) bool
    ) -> torch.Tensor:
        b, tt, n, d = x.shape
        ln = partial(stateless_layer_norm, eps=self.eps)
        m = (self.scale_shift_table[None] + mod).to(x.dtype)[:, :, None, None, :]  # (B,6,1,1,D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = m.unbind(1)

        # spatial self-attention: time folded into the batch
        h = modulate(ln(x), shift_a, scale_a).reshape(b * tt, n, d)
        h = self.spatial_attn(h, rope=rope_s).view(b, tt, n, d)
        x = x + gate_a * ln(h)

        # temporal self-attention: space folded into the batch (skipped for a single frame)
        if self.has_temporal and tt > 1:
            h = ln(x).transpose(1, 2).reshape(b * n, tt, d)
            h = self.temporal.attn(h, rope=rope_t).view(b, n, tt, d).transpose(1, 2)
            x = x + self.temporal.gate.to(x.dtype) * ln(h)

        # cross-attention to the text tokens (all tokens of a sample at once)
        h = self.cross_attn(ln(x).reshape(b, tt * n, d), context=ctx, context_mask=ctx_mask)
        x = x + ln(h.view(b, tt, n, d))

        # MLP
        h = self.mlp(modulate(ln(x), shift_m, scale_m))
        return x + gate_m * ln(h)


class FinalLayer(nn.Module):
    """Stateless LN -> modulate (own shift/scale table + condition) -> linear to patch values."""

    def __init__(self, cfg: STIVConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.eps = cfg.norm_eps
        out = cfg.temporal_patch_size * cfg.patch_size**2 * cfg.in_channels
        self.linear = nn.Linear(d, out)
        self.scale_shift_table = nn.Parameter(torch.randn(2, d) / d**0.5)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = (
            (self.scale_shift_table[None] + c[:, None]).to(x.dtype)[:, :, None, None].unbind(1)
        )
        return self.linear(modulate(stateless_layer_norm(x, self.eps), shift, scale))


# ---------------------------------------------------------------------------- checkpointing

SDPA_OPS = {
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
    )
    if hasattr(torch.ops.aten, name)
}


def _is_masked_sdpa(op, args, kwargs) -> bool:
    if kwargs.get("attn_mask") is not None or kwargs.get("attn_bias") is not None:
        return True
    # efficient / cudnn / overrideable take the bias as the 4th positional argument
    return (
        op is not torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
        and len(args) > 3
        and isinstance(args[3], torch.Tensor)
    )


def keep_self_attention_policy(ctx, op, *args, **kwargs):
    """Selective activation checkpointing: save the outputs of the self-attention kernels
    (the only SDPA calls without a mask, see `layers.Attention`), recompute everything else."""
    if op in SDPA_OPS and not _is_masked_sdpa(op, args, kwargs):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _sac_context():
    return create_selective_checkpoint_contexts(keep_self_attention_policy)


# ---------------------------------------------------------------------------- the network


class STIV(nn.Module):
    """STIV DiT. `forward(...)` returns the velocity `x1 - eps` (flow matching, t = 1 is data).

    With `cfg.predict_clean` the network's raw output is the clean sample and `velocity()` (the
    one place where this happens) converts it: `v = (x_hat - x_t) / max(1 - t, 0.05)`.
    """

    def __init__(self, cfg: STIVConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.grad_checkpointing = cfg.grad_checkpointing
        self.patch_embed = PatchEmbed(cfg)
        self.cond_embed = ConditionEmbedder(cfg)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))  # shared by all blocks
        self.caption_proj = Mlp(cfg.text_dim, d, d)
        # One list of cfg.num_blocks blocks; MaskDiT runs the first `num_masked_blocks` on the kept
        # tokens only and the last `num_extra_unmasked_blocks` on all tokens.
        self.blocks = nn.ModuleList(STIVBlock(cfg) for _ in range(cfg.num_blocks))
        self.num_masked_blocks = cfg.num_blocks - cfg.num_extra_unmasked_blocks
        self.mask_token = nn.Parameter(torch.zeros(d))
        self.final_layer = FinalLayer(cfg)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DiT / PixArt initialisation: xavier linears, N(0, 0.02) for the condition MLPs and the
        shared AdaLN, zero final projection, temporal gates at `temporal_gate_init` (0: the
        temporal branch starts off)."""

        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.cond_embed.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for m in self.caption_proj.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for m in self.adaln.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for blk in self.stiv_blocks():
            blk.scale_shift_table.normal_(std=self.cfg.hidden_size**-0.5)
            if blk.has_temporal:
                nn.init.constant_(blk.temporal.gate, float(self.cfg.temporal_gate_init))
            for m in blk.modules():
                if isinstance(m, RMSNorm):
                    nn.init.ones_(m.weight)
        self.final_layer.scale_shift_table.normal_(std=self.cfg.hidden_size**-0.5)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ------------------------------------------------------------------ helpers
    def stiv_blocks(self) -> Iterator[STIVBlock]:
        """`self.blocks`, typed (a ModuleList yields plain Modules to a type checker)."""
        for blk in self.blocks:
            assert isinstance(blk, STIVBlock)
            yield blk

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """Network output -> velocity. Identity unless `cfg.predict_clean`, where
        `v = (x_hat - x_t) / max(1 - t, cfg.clean_pred_min_denominator)`, computed in fp32 and
        returned in the wider of the two input dtypes (so a bf16 x_hat under autocast does not
        round the up-to-20x amplified velocity to bf16 when x_t is fp32)."""
        if not self.cfg.predict_clean:
            return raw
        denom = (1 - t.float()).clamp(min=self.cfg.clean_pred_min_denominator).view(-1, 1, 1, 1, 1)
        v = (raw.float() - x_t.float()) / denom
        return v.to(torch.promote_types(raw.dtype, x_t.dtype))

    def _positions(self, tt: int, ht: int, wt: int, device) -> tuple[torch.Tensor, ...]:
        """Time (Tt,), row and column (Ht*Wt,) positions, interpolated into the RoPE base
        range; shared by RoPE and the absolute position codes."""
        ph, pw = grid_positions(ht, wt, self.cfg.rope_base_grid, device)
        return interpolated_positions(tt, self.cfg.rope_base_frames, device), ph, pw

    def _rope(self, pos_t, pos_h, pos_w) -> tuple[torch.Tensor, tuple, tuple]:
        hd = self.cfg.head_dim
        ang_s = rope_angles_2d(pos_h, pos_w, hd, self.cfg.rope_theta)  # (N, hd/2)
        rope_t = rope_cos_sin(rope_angles_1d(pos_t, hd, self.cfg.rope_theta))  # (Tt, hd)
        return ang_s, rope_cos_sin(ang_s), rope_t

    def _abs_pos(self, pos_t, pos_h, pos_w) -> torch.Tensor:
        """(Tt, Ht*Wt, D) fixed sin-cos absolute positions. A model without temporal attention
        (T2I) gives every frame time 0: its frames are images."""
        if not self.cfg.temporal_attention:
            pos_t = torch.zeros_like(pos_t)
        return absolute_position_embedding(pos_t, pos_h, pos_w, self.cfg.hidden_size)

    def _run(self, blocks, x: torch.Tensor, *args) -> torch.Tensor:
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in blocks:
            if use_ckpt:
                x = checkpoint(blk, x, *args, use_reentrant=False, context_fn=_sac_context)
            else:
                x = blk(x, *args)
        return x

    # ------------------------------------------------------------------ forward
    def predict(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        text_pooled: torch.Tensor,
        micro_cond: torch.Tensor,
        token_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw network output (velocity, or the clean sample under `predict_clean`)."""
        b, _, t_frames, _, _ = x.shape
        if micro_cond.shape != (b, NUM_MICRO_CONDS):
            raise ValueError(
                f"micro_cond must be (B, {NUM_MICRO_CONDS}), got {tuple(micro_cond.shape)}"
            )
        if text_tokens.shape[1] > self.cfg.max_text_tokens:
            raise ValueError(
                f"{text_tokens.shape[1]} text tokens > max_text_tokens {self.cfg.max_text_tokens}"
            )
        dtype = self.patch_embed.proj.weight.dtype
        tok = self.patch_embed(x.to(dtype))  # (B, Tt, Ht, Wt, D)
        _, tt, ht, wt, d = tok.shape
        n = ht * wt
        tok = tok.reshape(b, tt, n, d)
        positions = self._positions(tt, ht, wt, x.device)
        if self.cfg.abs_pos_embed:
            tok = tok + self._abs_pos(*positions).to(dtype)

        c = self.cond_embed(t, micro_cond, text_pooled)  # (B, D)
        mod = self.adaln(c).view(b, 6, d)
        ctx = self.caption_proj(text_tokens.to(dtype))
        ctx_mask = text_mask.bool()

        ang_s, rope_s, rope_t = self._rope(*positions)
        head, tail = self.blocks[: self.num_masked_blocks], self.blocks[self.num_masked_blocks :]
        if token_keep is None:
            tok = self._run(head, tok, mod, rope_s, rope_t, ctx, ctx_mask)
        else:
            # MaskDiT: keep the same spatial tokens in every frame.
            k = token_keep.shape[1]
            idx = token_keep[:, None, :, None].expand(b, tt, k, d)
            kept = tok.gather(2, idx)
            ang = ang_s[token_keep]  # (B, K, hd/2)
            cos, sin = rope_cos_sin(ang)
            rope_kept = tuple(
                r[:, None, None].expand(b, tt, 1, k, r.shape[-1]).reshape(b * tt, 1, k, r.shape[-1])
                for r in (cos, sin)
            )
            kept = self._run(head, kept, mod, rope_kept, rope_t, ctx, ctx_mask)
            full = self.mask_token.to(kept.dtype).expand(b, tt, n, d)
            tok = full.scatter(2, idx, kept)
        tok = self._run(tail, tok, mod, rope_s, rope_t, ctx, ctx_mask)

        out = self.final_layer(tok, c)  # (B, Tt, N, pt*p*p*C)
        p, pt = self.cfg.patch_size, self.cfg.temporal_patch_size
        out = out.view(b, tt, ht, wt, pt, p, p, self.cfg.in_channels)
        if t_frames == 1 and pt > 1:  # an image through a video model (see module docstring)
            out = out.mean(dim=4, keepdim=True)
        return rearrange(out, "b t h w pt ph pw c -> b c (t pt) (h ph) (w pw)")

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        text_pooled: torch.Tensor,
        micro_cond: torch.Tensor,
        token_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity prediction (B, C, T, H, W) for x_t = x (B, C, T, H, W) at time t (B,)."""
        raw = self.predict(x, t, text_tokens, text_mask, text_pooled, micro_cond, token_keep)
        return self.velocity(x, t, raw)
