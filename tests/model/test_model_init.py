"""Progressive initialisation: T2I -> T2V inflation and the "both" initialisation."""

import pytest
import torch

from model.config import get_preset
from model.init import inherit_rope_base, init_both, init_video_from_image, is_temporal_key
from model.network import STIV


def randomised(cfg, seed):
    torch.manual_seed(seed)
    m = STIV(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def inputs(b=2, seq=5, dim=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, 4, 1, 8, 8, generator=g)
    t = torch.rand(b, generator=g)
    tokens = torch.randn(b, seq, dim, generator=g)
    mask = torch.ones(b, seq, dtype=torch.bool)
    pooled = torch.randn(b, dim, generator=g)
    micro = torch.tensor([[64.0, 64, 0, 0, 64, 64, 3]] * b)
    return img, t, (tokens, mask, pooled, micro)


def t2i_and_t2v(t2i_temporal=False):
    image_model = randomised(
        get_preset("stiv-tiny", temporal_patch_size=1, temporal_attention=t2i_temporal), 0
    )
    video_model = randomised(get_preset("stiv-tiny"), 1)  # temporal gates non-zero before init
    return image_model, video_model


def test_t2v_init_reproduces_t2i_on_every_frame_of_a_repeated_image():
    image_model, video_model = t2i_and_t2v()
    report = init_video_from_image(video_model, image_model.state_dict())
    img, t, c = inputs()
    ref = image_model(img, t, *c)
    out = video_model(img.repeat(1, 1, 6, 1, 1), t, *c)  # 6 frames = 3 temporal tokens
    for f in range(6):
        torch.testing.assert_close(out[:, :, f : f + 1], ref, atol=1e-5, rtol=1e-5)
    # the image path of the video model also reproduces the T2I model
    torch.testing.assert_close(video_model(img, t, *c), ref, atol=1e-5, rtol=1e-5)
    assert sorted(report["inflated"]) == [
        "final_layer.linear.bias",
        "final_layer.linear.weight",
        "patch_embed.proj.weight",
    ]
    assert report["new"] and all(is_temporal_key(k) for k in report["new"])
    assert not any(is_temporal_key(k) for k in report["copied"])
    for blk in video_model.blocks:
        assert torch.equal(blk.temporal.gate, torch.zeros_like(blk.temporal.gate))


def test_temporal_branch_starts_at_zero_but_learns():
    image_model, video_model = t2i_and_t2v()
    init_video_from_image(video_model, image_model)
    _, t, c = inputs()
    video = torch.randn(2, 4, 4, 8, 8)  # a real (non-repeated) video
    video_model.train()(video, t, *c).square().mean().backward()
    gate_grads = [blk.temporal.gate.grad.abs().sum() for blk in video_model.blocks]
    assert all(g > 0 for g in gate_grads)  # the zero gate receives a gradient
    assert torch.equal(video_model.blocks[0].temporal.attn.qkv.weight.grad, torch.zeros_like(
        video_model.blocks[0].temporal.attn.qkv.weight))  # fmt: skip


def test_t2i_with_temporal_keys_and_state_dict_targets_and_compiled_prefixes():
    image_model, video_model = t2i_and_t2v(t2i_temporal=True)
    src = {"_orig_mod." + k: v for k, v in image_model.state_dict().items()}  # torch.compile keys
    report = init_video_from_image(video_model.state_dict(), src)
    sd = report["state_dict"]
    assert any(
        is_temporal_key(k) for k in report["ignored"]
    )  # the T2I temporal weights are not used
    video_model.load_state_dict(sd)
    img, t, c = inputs()
    torch.testing.assert_close(video_model(img.repeat(1, 1, 4, 1, 1), t, *c)[:, :, :1], image_model(img, t, *c),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_init_both():
    spatial_src = randomised(
        get_preset("stiv-tiny", temporal_patch_size=1, temporal_attention=False), 0
    )
    temporal_src = randomised(get_preset("stiv-tiny"), 2)
    target = randomised(get_preset("stiv-tiny"), 3)
    report = init_both(target, spatial_src, temporal_src)
    t_sd, s_sd, sd = temporal_src.state_dict(), spatial_src.state_dict(), target.state_dict()
    assert report["temporal"] and report["new"] == []
    for k in report["temporal"]:
        assert torch.equal(sd[k], t_sd[k])
    for k in report["copied"]:
        assert torch.equal(sd[k], s_sd[k])
    assert "patch_embed.proj.weight" in report["inflated"]


def test_inherit_rope_base():
    parent = get_preset("stiv-tiny")
    child = inherit_rope_base(
        get_preset("stiv-tiny", rope_base_grid=(8, 8), rope_base_frames=9), parent
    )
    assert (
        child.rope_base_grid == parent.rope_base_grid
        and child.rope_base_frames == parent.rope_base_frames
    )


def test_temporal_gate_init_option_opens_the_branch_from_step_one():
    """`temporal_gate_init` (tiny CPU runs): fresh and T2I-inflated video models start with the
    configured gate, so the temporal attention weights get a gradient at the first step."""
    fresh = STIV(get_preset("stiv-tiny", temporal_gate_init=1.0))
    assert all(torch.equal(b.temporal.gate, torch.ones_like(b.temporal.gate)) for b in fresh.blocks)
    image_model = randomised(get_preset("stiv-tiny", temporal_patch_size=1,
                                        temporal_attention=False), 0)  # fmt: skip
    video_model = randomised(get_preset("stiv-tiny", temporal_gate_init=0.5), 1)
    init_video_from_image(video_model, image_model)
    assert all(torch.all(b.temporal.gate == 0.5) for b in video_model.blocks)
    _, t, c = inputs()
    video_model.train()(torch.randn(2, 4, 4, 8, 8), t, *c).square().mean().backward()
    assert video_model.blocks[0].temporal.attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="temporal_gate_init"):
        get_preset("stiv-tiny", temporal_gate_init="open")
