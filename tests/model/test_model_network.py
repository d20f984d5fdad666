"""The STIV network: shapes, image == one-frame video, MaskDiT, checkpointing, numerics."""

import pytest
import torch

import model.network as network
from model.config import get_preset
from model.flow import random_spatial_mask
from model.network import STIV


def make_model(seed=0, **overrides):
    """Tiny model with every parameter perturbed (the final layer and temporal gates start at
    zero, which would make most comparisons trivial)."""
    torch.manual_seed(seed)
    m = STIV(get_preset("stiv-tiny", **overrides))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def make_inputs(cfg, b=2, t=4, h=8, w=8, seq=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, t, h, w, generator=g)
    tt = torch.rand(b, generator=g)
    tokens = torch.randn(b, seq, cfg.text_dim, generator=g)
    mask = torch.ones(b, seq, dtype=torch.bool)
    mask[0, 3:] = False
    pooled = torch.randn(b, cfg.text_dim, generator=g)
    micro = torch.tensor([[256.0, 320, 4, 8, 240, 300, 3]]).repeat(b, 1)
    return x, tt, tokens, mask, pooled, micro


def test_shapes_video_and_image():
    m = make_model()
    x, t, *cond = make_inputs(m.cfg)
    assert m(x, t, *cond).shape == x.shape
    img = x[:, :, :1]
    assert m(img, t, *cond).shape == img.shape
    with pytest.raises(ValueError):
        m(x[:, :, :3], t, *cond)  # 3 frames, temporal patch 2
    with pytest.raises(ValueError):
        m(x, t, *cond[:-1], cond[-1][:, :6])  # micro-conds must be (B, 7)


def test_image_run_equals_one_frame_video_run():
    """An image is a video with one temporal token: through a video model (temporal patch 2) an
    image (T=1, temporal patch 1) gives the mean of the 2-frame video made by repeating it."""
    m = make_model()
    x, t, *cond = make_inputs(m.cfg)
    img = x[:, :, :1]
    out_img = m(img, t, *cond)
    out_vid = m(img.repeat(1, 1, 2, 1, 1), t, *cond)
    torch.testing.assert_close(out_img, out_vid.mean(dim=2, keepdim=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("abs_pos", [False, True])
def test_t2i_model_runs_frames_as_images(abs_pos):
    """A T2I model (temporal patch 1, no temporal attention) treats each frame of a video as an
    image: running a T-frame video equals running its frames one by one."""
    m = make_model(temporal_patch_size=1, temporal_attention=False, abs_pos_embed=abs_pos)
    x, t, *cond = make_inputs(m.cfg, t=3)
    out = m(x, t, *cond)
    for f in range(3):
        torch.testing.assert_close(
            out[:, :, f : f + 1], m(x[:, :, f : f + 1], t, *cond), atol=1e-5, rtol=1e-5
        )


def test_absolute_positions_are_distinct_and_change_the_output():
    """`abs_pos_embed` adds fixed codes (no parameters: checkpoints stay compatible), one
    distinct code per (time, row, column) token."""
    m = make_model(abs_pos_embed=True)
    plain = STIV(m.cfg.replace(abs_pos_embed=False)).eval()
    plain.load_state_dict(m.state_dict(), strict=True)
    x, t, *cond = make_inputs(m.cfg)
    assert not torch.allclose(m(x, t, *cond), plain(x, t, *cond))
    codes = m._abs_pos(*m._positions(2, 4, 4, None))
    assert codes.shape == (2, 16, m.cfg.hidden_size)
    flat = codes.reshape(32, -1)
    distance = torch.cdist(flat, flat) + torch.eye(32) * 1e9
    assert distance.min() > 0.1
    # the same codes at the same positions, whatever else is in the batch
    torch.testing.assert_close(m._abs_pos(*m._positions(2, 4, 4, None)), codes)


def test_pooled_text_can_be_left_out_of_the_condition():
    """`text_pooled=False`: no parameters for the pooled vector and the output ignores it (the
    tokens still condition through cross-attention); True: the pooled vector matters."""
    with_pooled = make_model(text_pooled=True)
    without = make_model(text_pooled=False)
    assert not any("text_pooled" in n for n, _ in without.named_parameters())
    assert any("text_pooled" in n for n, _ in with_pooled.named_parameters())
    x, t, tokens, mask, pooled, micro = make_inputs(without.cfg)
    other = torch.randn_like(pooled)
    out = without(x, t, tokens, mask, pooled, micro)
    torch.testing.assert_close(without(x, t, tokens, mask, other, micro), out, atol=0, rtol=0)
    assert not torch.allclose(without(x, t, torch.randn_like(tokens), mask, pooled, micro), out)
    assert not torch.allclose(
        with_pooled(x, t, tokens, mask, pooled, micro),
        with_pooled(x, t, tokens, mask, other, micro),
    )


def test_temporal_attention_is_bidirectional():
    m = make_model()
    x, t, *cond = make_inputs(m.cfg, t=6)
    out = m(x, t, *cond)
    x2 = x.clone()
    x2[:, :, -2:] += 1.0  # change the last temporal token only
    out2 = m(x2, t, *cond)
    assert (out2[:, :, :2] - out[:, :, :2]).abs().max() > 1e-4  # the first frames see the future


def test_text_padding_is_ignored():
    m = make_model()
    x, t, tokens, mask, pooled, micro = make_inputs(m.cfg)
    out = m(x, t, tokens, mask, pooled, micro)
    tokens2 = tokens.clone()
    tokens2[0, 3:] = 50.0  # padding positions of sample 0
    torch.testing.assert_close(m(x, t, tokens2, mask, pooled, micro), out)


def test_maskdit_ratio_zero_equals_unmasked():
    m = make_model()
    x, t, *cond = make_inputs(m.cfg)
    n = (x.shape[-2] // 2) * (x.shape[-1] // 2)
    keep = random_spatial_mask(x.shape[0], n, 0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, torch.arange(n).expand(x.shape[0], n))
    torch.testing.assert_close(
        m(x, t, *cond, token_keep=keep), m(x, t, *cond), atol=1e-6, rtol=1e-6
    )


def test_maskdit_drops_tokens_in_every_frame_and_restores_them():
    m = make_model()
    x, t, *cond = make_inputs(m.cfg)
    b, n = x.shape[0], 16
    keep = random_spatial_mask(b, n, 0.5, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (b, 8)
    seen = {}

    def record(name):
        def hook(mod, args):
            seen.setdefault(name, args[0].shape)

        return hook

    hooks = [
        m.blocks[0].register_forward_pre_hook(record("first")),
        m.blocks[-1].register_forward_pre_hook(record("tail")),
    ]
    out = m(x, t, *cond, token_keep=keep)
    for h in hooks:
        h.remove()
    assert seen["first"] == (b, 2, 8, m.cfg.hidden_size)  # (B, Tt, kept tokens, D)
    assert seen["tail"] == (b, 2, 16, m.cfg.hidden_size)  # restored with mask tokens
    assert out.shape == x.shape and torch.isfinite(out).all()
    # the content of dropped positions (in every frame) never enters the network
    dropped = torch.ones(b, n, dtype=torch.bool)
    dropped.scatter_(1, keep, False)
    pix = dropped.view(b, 1, 1, 4, 1, 4, 1).expand(b, 1, 1, 4, 2, 4, 2).reshape(b, 1, 1, 8, 8)
    x2 = torch.where(pix, x + 3.0, x)
    torch.testing.assert_close(m(x2, t, *cond, token_keep=keep), out)


def test_grad_checkpointing_matches_and_keeps_only_self_attention(monkeypatch):
    x, t, *cond = make_inputs(get_preset("stiv-tiny"))
    grads, outs = [], []
    for ckpt in (False, True):
        m = make_model(grad_checkpointing=ckpt).train()
        out = m(x, t, *cond)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5)

    decisions = []
    orig = network.keep_self_attention_policy

    def spy(ctx, op, *args, **kwargs):
        d = orig(ctx, op, *args, **kwargs)
        if not ctx.is_recompute:
            decisions.append((op in network.SDPA_OPS, d))
        return d

    monkeypatch.setattr(network, "keep_self_attention_policy", spy)
    m = make_model(grad_checkpointing=True).train()
    m(x, t, *cond).sum().backward()
    saved = [d for d in decisions if d[1] == torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE]
    sdpa_calls = [d for d in decisions if d[0]]
    nb = m.cfg.num_blocks
    assert len(sdpa_calls) == 3 * nb  # spatial, temporal, cross per block
    assert len(saved) == 2 * nb and all(
        d[0] for d in saved
    )  # only spatial + temporal self-attention


def test_predict_clean_converts_to_velocity():
    m = make_model(predict_clean=True)
    x, t, *cond = make_inputs(m.cfg)
    t = torch.tensor([0.3, 0.99])
    raw = m.predict(x, t, *cond)
    v = m(x, t, *cond)
    expected = (raw - x) / torch.tensor([0.7, 0.05]).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(v, expected, atol=1e-5, rtol=1e-5)
    assert m.velocity(x, t, raw.bfloat16()).dtype == torch.float32  # no bf16 rounding of v
    m2 = make_model(predict_clean=False)
    torch.testing.assert_close(m2(x, t, *cond), m2.predict(x, t, *cond))


def test_bf16_forward_is_finite_and_close():
    m = make_model()
    x, t, *cond = make_inputs(m.cfg)
    ref = m(x, t, *cond)
    out = m.to(torch.bfloat16)(x, t, *cond)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05


def test_rope_interpolation_runs_on_larger_grid_and_longer_clip():
    m = make_model()  # base grid 4x4 tokens, 4 temporal tokens
    x, t, *cond = make_inputs(m.cfg, t=12, h=16, w=16)  # 8x8 tokens, 6 temporal tokens
    out = m(x, t, *cond)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("masked", [False, True])
def test_compiles_without_graph_breaks(masked):
    torch._dynamo.reset()
    m = make_model()
    x, t, *cond = make_inputs(m.cfg)
    keep = random_spatial_mask(2, 16, 0.5) if masked else None
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    torch.testing.assert_close(
        compiled(x, t, *cond, token_keep=keep), m(x, t, *cond, token_keep=keep)
    )


def test_compiled_training_step_with_checkpointing_and_maskdit():
    """AOTAutograd (what inductor builds on) traces forward + backward in one graph, with the
    selective-checkpointing policy and MaskDiT gathers, and gives the eager gradients."""
    torch._dynamo.reset()
    m = make_model(grad_checkpointing=True).train()
    x, t, *cond = make_inputs(m.cfg)
    keep = random_spatial_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    m(x, t, *cond, token_keep=keep).square().mean().backward()
    ref = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    compiled(x, t, *cond, token_keep=keep).square().mean().backward()
    for k, p in m.named_parameters():
        if k in ref:
            torch.testing.assert_close(p.grad, ref[k], atol=1e-6, rtol=1e-5)
