"""Flow-matching conventions, masked loss, frame replacement, condition dropout, MaskDiT masks."""

import pytest
import torch

from model.config import get_preset
from model.flow import (
    apply_condition_dropout,
    endpoints_mask,
    first_frames_mask,
    flow_matching_loss,
    interpolate,
    random_spatial_mask,
    replace_frames,
    sample_timesteps,
    shift_time,
    training_loss,
    velocity_target,
    visible_latent_mask,
)
from model.network import STIV


def test_conventions_t0_noise_t1_data_target_is_derivative():
    x1, eps = torch.randn(3, 4, 2, 4, 4), torch.randn(3, 4, 2, 4, 4)
    torch.testing.assert_close(interpolate(x1, eps, torch.zeros(3)), eps)
    torch.testing.assert_close(interpolate(x1, eps, torch.ones(3)), x1)
    t, dt = torch.full((3,), 0.3), 1e-3
    fd = (interpolate(x1, eps, t + dt) - interpolate(x1, eps, t)) / dt
    torch.testing.assert_close(fd, velocity_target(x1, eps), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(velocity_target(x1, eps), x1 - eps)


def test_loss_is_plain_mse_without_masks():
    p, q = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    torch.testing.assert_close(flow_matching_loss(p, q), ((p - q) ** 2).mean())


def test_loss_gradient_is_zero_at_replaced_frames():
    pred = torch.randn(3, 4, 6, 4, 4, requires_grad=True)
    target = torch.randn(3, 4, 6, 4, 4)
    given = torch.zeros(3, 6, dtype=torch.bool)
    given[0, 0] = True  # TI2V
    given[1, :3] = True  # prediction from 3 frames
    given[2, [0, 5]] = True  # interpolation
    flow_matching_loss(pred, target, given_frames=given).backward()
    g = pred.grad.abs().sum(dim=(1, 3, 4))  # (B, T)
    assert (g[given] == 0).all()
    assert (g[~given] > 0).all()
    # the value only averages over the frames that count
    w = (~given).float()[:, None, :, None, None].expand_as(pred)
    expected = (((pred - target) ** 2) * w).sum() / w.sum()
    torch.testing.assert_close(flow_matching_loss(pred, target, given_frames=given), expected)


def test_loss_restricted_to_visible_tokens_under_maskdit():
    pred = torch.randn(2, 4, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 4, 8, 8)
    keep = random_spatial_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    vis = visible_latent_mask(keep, (4, 4), 2)  # (B, 1, 1, 8, 8)
    assert vis.shape == (2, 1, 1, 8, 8) and vis.sum() == 2 * 8 * 4
    flow_matching_loss(pred, target, token_keep=keep, patch_size=2).backward()
    g = pred.grad.abs().sum(dim=(1, 2))  # (B, H, W)
    assert (g[vis[:, 0, 0] == 0] == 0).all() and (g[vis[:, 0, 0] == 1] > 0).all()


def test_replace_frames_is_bit_exact_and_masks():
    x, clean = torch.randn(2, 3, 5, 4, 4), torch.randn(2, 3, 5, 4, 4)
    assert torch.equal(replace_frames(x, clean, None), x)
    m = endpoints_mask(2, 5)
    assert m.tolist() == [[True, False, False, False, True]] * 2
    assert first_frames_mask(2, 5, k=2).tolist() == [[True, True, False, False, False]] * 2
    y = replace_frames(x, clean, m)
    assert torch.equal(y[:, :, [0, 4]], clean[:, :, [0, 4]]) and torch.equal(
        y[:, :, 1:4], x[:, :, 1:4]
    )


def test_timestep_samplers():
    g = torch.Generator().manual_seed(0)
    u = sample_timesteps(20000, kind="uniform", generator=g)
    assert u.min() >= 0 and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01
    ln = sample_timesteps(20000, kind="logit_normal", generator=g)
    assert ln.min() > 0 and ln.max() < 1 and abs(ln.median() - 0.5) < 0.02
    assert ((ln > 0.25) & (ln < 0.75)).float().mean() > (
        (u > 0.25) & (u < 0.75)
    ).float().mean() + 0.1
    shifted = sample_timesteps(20000, kind="logit_normal", mean=1.0, generator=g)
    assert shifted.median() > 0.7  # positive mean: more samples near the data end
    a = sample_timesteps(8, generator=torch.Generator().manual_seed(3))
    b = sample_timesteps(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        sample_timesteps(4, kind="cosine")


def test_timestep_shift_moves_time_towards_noise():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(shift_time(t, 1.0), t)
    s4 = shift_time(t, 4.0)
    assert s4[0] == 0 and s4[-1] == 1 and torch.all(s4[1:-1] < t[1:-1])
    assert torch.all(s4[1:] > s4[:-1])  # still monotone
    # SD3's form on the noise level s = 1 - t: s' = shift * s / (1 + (shift - 1) * s)
    torch.testing.assert_close(1 - s4[5], torch.tensor(4 * 0.5 / (1 + 3 * 0.5)))
    # shifting a logit-normal by `shift` is a logit-normal with mean - log(shift)
    g = torch.Generator().manual_seed(0)
    shifted = sample_timesteps(20000, shift=4.0, generator=g)
    assert abs(float(shifted.median()) - float(torch.sigmoid(-torch.log(torch.tensor(4.0))))) < 0.02
    with pytest.raises(ValueError):
        shift_time(t, 0.0)


def test_random_spatial_mask():
    keep = random_spatial_mask(4, 64, 0.5, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (4, 32)
    for row in keep:
        assert torch.equal(row, row.sort().values) and row.unique().numel() == 32
    assert not torch.equal(keep[0], keep[1])
    assert torch.equal(random_spatial_mask(2, 10, 0.0), torch.arange(10).expand(2, 10))
    with pytest.raises(ValueError):
        random_spatial_mask(2, 10, 1.0)


def _cond(b, seq=6, dim=8):
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(b, seq, dim, generator=g)
    mask = torch.ones(b, seq, dtype=torch.bool)
    pooled = torch.randn(b, dim, generator=g)
    null = (
        torch.randn(3, dim, generator=g),
        torch.tensor([True, True, False]),
        torch.randn(dim, generator=g),
    )
    return tokens, mask, pooled, null


def test_condition_dropout_rates_independence_and_null_prompt():
    b = 40000
    tokens, mask, pooled, (nt, nm, npool) = _cond(b)
    given = first_frames_mask(b, 4)
    d = apply_condition_dropout(
        tokens, mask, pooled, given, null_text_tokens=nt, null_text_mask=nm, null_text_pooled=npool,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    pt, pi = d.text_dropped.float().mean().item(), d.image_dropped.float().mean().item()
    assert abs(pt - 0.10) < 0.01 and abs(pi - 0.08) < 0.01
    both = (d.text_dropped & d.image_dropped).float().mean().item()
    assert abs(both - pt * pi) < 0.004  # independent
    td, kept = d.text_dropped, ~d.text_dropped
    # dropped text is exactly the encoded empty prompt, padded (with masked positions) to 6 tokens
    assert torch.equal(d.text_tokens[td][:, :3], nt.expand(int(td.sum()), 3, 8))
    assert (d.text_tokens[td][:, 3:] == 0).all()
    assert d.text_mask[td].tolist()[0] == [True, True, False, False, False, False]
    assert torch.equal(d.text_pooled[td], npool.expand(int(td.sum()), 8))
    assert torch.equal(d.text_tokens[kept], tokens[kept]) and torch.equal(
        d.text_pooled[kept], pooled[kept]
    )
    # image dropout leaves frame 0 noised: no given frame in those samples
    assert not d.given_frames[d.image_dropped].any()
    assert torch.equal(d.given_frames[~d.image_dropped], given[~d.image_dropped])


def test_training_loss_masks_and_maskdit_switch():
    torch.manual_seed(0)
    m = STIV(get_preset("stiv-tiny", mask_ratio=0.5)).train()
    x1 = torch.randn(2, 4, 4, 8, 8)
    tokens, mask, pooled, null = _cond(2, dim=16)
    null = (torch.randn(3, 16), null[1], torch.randn(16))
    micro = torch.tensor([[64.0, 64, 0, 0, 64, 64, 1]] * 2)
    loss, aux = training_loss(
        m, x1, tokens, mask, pooled, micro, given_frames=first_frames_mask(2, 4), null_text=null,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert aux["token_keep"].shape == (2, 8)  # 50% of 16 spatial tokens kept while training
    loss.backward()
    assert m.mask_token.grad is not None
    m.eval()
    _, aux = training_loss(m, x1, tokens, mask, pooled, micro)
    assert aux["token_keep"] is None  # unmasked in eval
    _, aux = training_loss(m.train(), x1, tokens, mask, pooled, micro, mask_ratio=0.0)
    assert aux["token_keep"] is None  # the switch to train unmasked


def test_training_loss_draws_times_with_the_models_shift():
    x1 = torch.randn(64, 4, 4, 8, 8)
    tokens, mask, pooled, _ = _cond(64, dim=16)
    micro = torch.tensor([[64.0, 64, 0, 0, 64, 64, 1]] * 64)
    medians = {}
    for shift in (1.0, 8.0):
        m = STIV(get_preset("stiv-tiny", timestep_shift=shift))
        _, aux = training_loss(
            m, x1, tokens, mask, pooled, micro, generator=torch.Generator().manual_seed(0)
        )
        medians[shift] = float(aux["t"].median())
    assert medians[8.0] < 0.3 < 0.35 < medians[1.0]  # shifted towards noise (t = 0)
    with pytest.raises(ValueError, match="timestep_shift"):
        get_preset("stiv-tiny", timestep_shift=0)


def test_training_loss_through_wrappers():
    """DDP / DeepSpeed engines expose the model as `.module`; torch.compile as `._orig_mod`."""
    torch.manual_seed(0)
    m = STIV(get_preset("stiv-tiny")).train()

    class Wrapper(torch.nn.Module):  # what DDP / DeepSpeed look like from here
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    x1 = torch.randn(2, 4, 2, 8, 8)
    tokens, mask, pooled, _ = _cond(2, dim=16)
    micro = torch.tensor([[64.0, 64, 0, 0, 64, 64, 1]] * 2)
    kw = dict(t=torch.tensor([0.2, 0.6]), noise=torch.randn_like(x1))
    ref, _ = training_loss(m, x1, tokens, mask, pooled, micro, **kw)
    wrapped, _ = training_loss(Wrapper(m).train(), x1, tokens, mask, pooled, micro, **kw)
    torch.testing.assert_close(wrapped, ref)
