"""RoPE (shift invariance, interpolation), QK-norm attention, stateless norms."""

import torch

from model.layers import (
    Attention,
    grid_positions,
    interpolated_positions,
    last_token,
    rope_angles_1d,
    rope_angles_2d,
    rope_cos_sin,
    stateless_layer_norm,
)


def _attn(seed=0, dim=32, heads=2):
    torch.manual_seed(seed)
    return Attention(dim, heads, qk_norm=True).eval()


def test_rope_1d_attention_depends_only_on_relative_position():
    attn = _attn()
    x = torch.randn(2, 7, 32)
    hd = attn.head_dim
    pos = torch.arange(7.0)
    out = attn(x, rope=rope_cos_sin(rope_angles_1d(pos, hd)))
    for shift in (1.0, 5.0, 37.0, 0.5):
        shifted = attn(x, rope=rope_cos_sin(rope_angles_1d(pos + shift, hd)))
        torch.testing.assert_close(shifted, out, atol=2e-5, rtol=1e-4)
    # ...and it does depend on position: reversing the order of positions changes the output
    other = attn(x, rope=rope_cos_sin(rope_angles_1d(pos.flip(0), hd)))
    assert (other - out).abs().max() > 1e-3


def test_rope_2d_attention_depends_only_on_relative_position():
    attn = _attn(1)
    h, w = 3, 4
    x = torch.randn(2, h * w, 32)
    hd = attn.head_dim
    ph, pw = grid_positions(h, w, base=(16, 16))
    out = attn(x, rope=rope_cos_sin(rope_angles_2d(ph, pw, hd)))
    for dh, dw in ((1, 0), (0, 3), (7, 2)):
        shifted = attn(x, rope=rope_cos_sin(rope_angles_2d(ph + dh, pw + dw, hd)))
        torch.testing.assert_close(shifted, out, atol=2e-5, rtol=1e-4)
    # rows and columns are distinguished: transposing the roles changes the output
    swapped = attn(x, rope=rope_cos_sin(rope_angles_2d(pw, ph, hd)))
    assert (swapped - out).abs().max() > 1e-3


def test_rope_logits_are_a_function_of_offset():
    hd = 16
    q, k = torch.randn(hd), torch.randn(hd)
    from model.layers import apply_rope

    def logit(pq, pk):
        cq, sq = rope_cos_sin(rope_angles_1d(torch.tensor([pq]), hd))
        ck, sk = rope_cos_sin(rope_angles_1d(torch.tensor([pk]), hd))
        return (apply_rope(q[None], cq, sq) * apply_rope(k[None], ck, sk)).sum()

    torch.testing.assert_close(logit(3.0, 1.0), logit(13.0, 11.0), atol=1e-5, rtol=1e-5)
    assert abs(logit(3.0, 1.0) - logit(1.0, 3.0)) > 1e-4


def test_position_interpolation():
    torch.testing.assert_close(interpolated_positions(5, base=8), torch.arange(5.0))
    pos = interpolated_positions(32, base=16)  # twice the trained size: half-step positions
    assert pos.max() < 16 and torch.allclose(pos[1] - pos[0], torch.tensor(0.5))
    ph, pw = grid_positions(4, 32, base=(16, 16))
    assert ph.max() == 3 and pw.max() < 16


def test_stateless_layer_norm_bf16_and_no_params():
    x = (torch.randn(4, 64) * 300).bfloat16()
    y = stateless_layer_norm(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    ref = torch.nn.functional.layer_norm(x.float(), (64,), eps=1e-6)
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)


def test_cross_attention_ignores_padding_tokens():
    torch.manual_seed(0)
    attn = Attention(32, 2, cross=True).eval()
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = attn(x, context=ctx, context_mask=mask)
    ctx2 = ctx.clone()
    ctx2[0, 3:] = 100.0
    torch.testing.assert_close(attn(x, context=ctx2, context_mask=mask), out)
    # a row with no real token stays finite (attends to position 0)
    empty = torch.zeros_like(mask)
    assert torch.isfinite(attn(x, context=ctx, context_mask=empty)).all()


def test_last_token_pooling_skips_padding():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)  # right / left pad
    pooled = last_token(hidden, mask)
    assert torch.equal(pooled[0], hidden[0, 2]) and torch.equal(pooled[1], hidden[1, 4])
