"""Building blocks: stateless LayerNorm, sinusoidal embeddings, RoPE, QK-norm attention, MLP.

Numerics (bf16-safe): norms, RoPE and the sinusoidal embeddings are computed in fp32 and cast
back to the input dtype. Attention goes through `F.scaled_dot_product_attention`, so Flash /
memory-efficient kernels are used on GPUs; those kernels accumulate the logits and the softmax
in fp32 even for bf16 inputs (the math fallback upcasts too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------- norms


def stateless_layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim with no learned affine, computed in fp32."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learned per-channel weight (used for QK-norm), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf * self.weight.float()  # stays fp32: RoPE follows in fp32


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # (1 + scale): identity modulation at zero, as in DiT / PixArt.
    return x * (1 + scale) + shift


# ---------------------------------------------------------------------------- embeddings


def sinusoidal_embedding(
    values: torch.Tensor, dim: int, max_period: float = 10000.0
) -> torch.Tensor:
    """(...,) float -> (..., dim) fp32 [cos | sin] embedding (DiT's timestep embedding)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half
    )
    args = values.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def absolute_position_embedding(
    pos_t: torch.Tensor, pos_h: torch.Tensor, pos_w: torch.Tensor, dim: int
) -> torch.Tensor:
    """Fixed 3D sin-cos positions (Tt, N, dim), fp32: time (Tt,) and per-token row / column
    (N,) positions each get their own block of `sinusoidal_embedding` channels (rows and
    columns 2 * (dim // 6) each, time the rest). Wavelengths span 2*pi to 2*pi*100 positions,
    so grids of a few tokens (interpolated into the RoPE base range) still get distinct codes."""
    dh = 2 * (dim // 6)
    dt = dim - 2 * dh
    if dt <= 0 or dt % 2:
        raise ValueError(f"absolute positions need an even dim >= 6, got {dim}")
    et = sinusoidal_embedding(pos_t, dt, max_period=100.0)  # (Tt, dt)
    eh = sinusoidal_embedding(pos_h, dh, max_period=100.0)  # (N, dh)
    ew = sinusoidal_embedding(pos_w, dh, max_period=100.0)
    tt, n = et.shape[0], eh.shape[0]
    space = torch.cat([eh, ew], dim=-1)
    return torch.cat([et[:, None].expand(tt, n, dt), space[None].expand(tt, n, 2 * dh)], dim=-1)


def last_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pooled text: the embedding at the last real (non-padding, EOS) position of each row.

    hidden (B, L, D), mask (B, L) bool with True = real token (any padding side). A row with no
    real token falls back to position 0. This is what `text_pooled` should be for a causal text
    encoder (never a padding position; docs/design-notes.md "Text encoder: pooled text and the empty prompt")."""
    m = mask.bool()
    pos = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, pos, torch.zeros_like(pos)).amax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class Mlp(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim or in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ScalarEmbedder(nn.Module):
    """A group of scalars -> per-scalar sinusoidal embeddings, concatenated -> MLP -> hidden."""

    def __init__(self, num_scalars: int, hidden: int, freq_dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.scale = scale
        self.mlp = nn.Sequential(
            nn.Linear(num_scalars * freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )

    def forward(self, values: torch.Tensor) -> torch.Tensor:  # (B, n) -> (B, hidden)
        emb = sinusoidal_embedding(values * self.scale, self.freq_dim).flatten(1)
        return self.mlp(emb.to(next(self.mlp.parameters()).dtype))


# ---------------------------------------------------------------------------- RoPE
#
# Layout: "rotate half". For a head dim `d`, channel i is paired with channel i + d/2 and the pair
# is rotated by angle[i], i < d/2. 1D RoPE: angle[i] = pos * theta^(-2i/d). 2D RoPE: the first d/4
# angles use the row position, the next d/4 the column position, each with its own frequency
# ladder theta^(-2j/(d/2)). Relative-position property: <R(p) q, R(p') k> depends only on p - p'.


def interpolated_positions(n: int, base: int, device: torch.device | None = None) -> torch.Tensor:
    """Positions 0..n-1, squeezed into [0, base) when n > base (RoPE position interpolation)."""
    pos = torch.arange(n, dtype=torch.float32, device=device)
    if n > base:
        pos = pos * (base / n)
    return pos


def _axis_freqs(axis_dim: int, theta: float, device: torch.device | None) -> torch.Tensor:
    return theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float32, device=device) / axis_dim)


def rope_angles_1d(pos: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """pos (..., N) -> angles (..., N, head_dim/2), fp32."""
    return pos.float()[..., None] * _axis_freqs(head_dim, theta, pos.device)


def rope_angles_2d(
    pos_h: torch.Tensor, pos_w: torch.Tensor, head_dim: int, theta: float = 10000.0
) -> torch.Tensor:
    """Per-token row / column positions (..., N) -> angles (..., N, head_dim/2), fp32."""
    f = _axis_freqs(head_dim // 2, theta, pos_h.device)
    return torch.cat([pos_h.float()[..., None] * f, pos_w.float()[..., None] * f], dim=-1)


def grid_positions(
    h: int, w: int, base: tuple[int, int], device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major (h*w,) row and column positions with interpolation against `base`."""
    ph = interpolated_positions(h, base[0], device)
    pw = interpolated_positions(w, base[1], device)
    return ph[:, None].expand(h, w).reshape(-1), pw[None, :].expand(h, w).reshape(-1)


def rope_cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """angles (..., N, d/2) -> cos, sin (..., N, d) for the rotate-half layout (fp32)."""
    a = torch.cat([angles, angles], dim=-1)
    return a.cos(), a.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., N, d) fp32; cos/sin broadcastable to x. Returns fp32."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ---------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Multi-head attention with QK-norm (RMSNorm before RoPE) and optional RoPE.

    Self-attention when `context is None` (never masked: MaskDiT drops tokens instead); cross-
    attention otherwise, always with a key padding mask. The gradient-checkpointing policy in
    `model.network` relies on this split (an SDPA call without a mask is a self-attention).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, cross: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.cross = cross
        if cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, H, N, hd)
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, N, D). rope: (cos, sin) broadcastable to (B, H, N, hd). context (B, L, D),
        context_mask (B, L) bool, True = attend."""
        b, n, d = x.shape
        if self.cross:
            q = self._heads(self.q(x))
            k, v = self.kv(context).chunk(2, dim=-1)
            k, v = self._heads(k), self._heads(v)
        else:
            q, k, v = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        dtype = v.dtype
        q, k = self.q_norm(q).float(), self.k_norm(k).float()
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k = q.to(dtype), k.to(dtype)
        mask = None
        if context_mask is not None:
            # A row with no real token would give NaNs: let it attend to position 0 instead.
            first = torch.arange(context_mask.shape[1], device=context_mask.device) == 0
            cm = context_mask | (first & ~context_mask.any(dim=1, keepdim=True))
            mask = cm[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))
