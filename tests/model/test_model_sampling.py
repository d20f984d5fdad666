"""Sampler: frame replacement, determinism, JIT-CFG batching, renormalisation, solvers."""

import pytest
import torch
from torch import nn

from model.config import get_preset
from model.flow import endpoints_mask, first_frames_mask, interpolate, shift_time
from model.network import STIV
from model.sampling import cfg_combine, sample

SHAPE = (2, 4, 4, 8, 8)


def make_model(seed=0):
    torch.manual_seed(seed)
    m = STIV(get_preset("stiv-tiny"))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def cond(b=2, seq=5, dim=16):
    g = torch.Generator().manual_seed(7)
    return {
        "text_tokens": torch.randn(b, seq, dim, generator=g),
        "text_mask": torch.ones(b, seq, dtype=torch.bool),
        "text_pooled": torch.randn(b, dim, generator=g),
        "null_text_tokens": torch.randn(2, dim, generator=g),  # shorter: gets padded
        "null_text_mask": torch.tensor([True, True]),
        "null_text_pooled": torch.randn(dim, generator=g),
        "micro_cond": torch.tensor([[64.0, 64, 0, 0, 64, 64, 3]] * b),
    }


class Spy(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []
        self.cfg = inner.cfg

    def forward(self, x, t, tokens, mask, pooled, micro, token_keep=None):
        self.calls.append(
            {"x": x.clone(), "t": t.clone(), "tokens": tokens.clone(), "mask": mask.clone()}
        )
        return self.inner(x, t, tokens, mask, pooled, micro)


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("which", ["ti2v", "prediction", "interpolation"])
def test_given_frames_are_bit_exact(solver, which):
    m = make_model()
    given = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    mask = {
        "ti2v": first_frames_mask(2, 4),
        "prediction": first_frames_mask(2, 4, k=2),
        "interpolation": endpoints_mask(2, 4),
    }[which]
    out = sample(
        m, shape=SHAPE, **cond(), given_latents=given, given_mask=mask, steps=3, solver=solver
    )
    assert torch.equal(out.permute(0, 2, 1, 3, 4)[mask], given.permute(0, 2, 1, 3, 4)[mask])
    assert torch.isfinite(out).all()
    assert not torch.equal(out.permute(0, 2, 1, 3, 4)[~mask], given.permute(0, 2, 1, 3, 4)[~mask])


def test_deterministic_under_seed():
    m = make_model()
    a = sample(m, shape=SHAPE, **cond(), steps=3, seed=11)
    b = sample(m, shape=SHAPE, **cond(), steps=3, seed=11)
    c = sample(m, shape=SHAPE, **cond(), steps=3, seed=12)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_cfg_scale_one_equals_conditional():
    vc, vu = torch.randn(SHAPE), torch.randn(SHAPE)
    torch.testing.assert_close(cfg_combine(vc, vu, 1.0, renorm=False), vc)
    torch.testing.assert_close(cfg_combine(vc, vu, 1.0, renorm=True), vc)
    torch.testing.assert_close(cfg_combine(vc, vu, 0.0, renorm=False), vu)
    m = make_model()
    kw = dict(shape=SHAPE, **cond(), steps=3, seed=3)
    ref = sample(m, cfg_scale=None, **kw)  # conditional model only
    for renorm in (False, True):
        torch.testing.assert_close(
            sample(m, cfg_scale=1.0, renorm=renorm, **kw), ref, atol=1e-5, rtol=1e-5
        )


def test_renorm_keeps_conditional_norm():
    vc, vu = torch.randn(SHAPE), 3 * torch.randn(SHAPE)
    v = cfg_combine(vc, vu, 7.5, renorm=True)
    torch.testing.assert_close(v.flatten(1).norm(dim=1), vc.flatten(1).norm(dim=1))
    raw = cfg_combine(vc, vu, 7.5, renorm=False)
    torch.testing.assert_close(v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1),
                               raw / raw.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1))  # same direction  # fmt: skip
    assert not torch.allclose(raw.flatten(1).norm(dim=1), vc.flatten(1).norm(dim=1))
    # with given frames excluded from the norms
    w = (~first_frames_mask(2, 4)).float()[:, None, :, None, None]
    v = cfg_combine(vc, vu, 7.5, renorm=True, weight=w)
    torch.testing.assert_close((v * w).flatten(1).norm(dim=1), (vc * w).flatten(1).norm(dim=1))


def test_jit_cfg_batches_both_passes_and_noises_frame0_in_unconditional_pass():
    spy = Spy(make_model())
    given = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    mask = first_frames_mask(2, 4)
    c = cond()
    steps, seed = 3, 5
    sample(spy, shape=SHAPE, **c, given_latents=given, given_mask=mask, steps=steps, seed=seed)
    assert len(spy.calls) == steps
    eps0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    for call, t in zip(spy.calls, [0.0, 1 / 3, 2 / 3]):
        x, tt = call["x"], call["t"]
        assert x.shape[0] == 4 and torch.allclose(tt, torch.full((4,), t))  # one batch of 2B
        assert torch.equal(x[:2, :, 0], given[:, :, 0])  # conditional: clean image latent
        noised = interpolate(given, eps0, tt[:2])[:, :, 0]
        torch.testing.assert_close(x[2:, :, 0], noised)  # unconditional: image noised to level t
        assert torch.equal(call["tokens"][2:, :2], c["null_text_tokens"].expand(2, 2, 16))
        assert call["mask"][2:].tolist() == [[True, True, False, False, False]] * 2
        assert torch.equal(call["tokens"][:2], c["text_tokens"])
    spy.calls.clear()
    sample(spy, shape=SHAPE, **c, steps=steps, solver="heun")
    assert len(spy.calls) == 2 * steps


class LinearField(nn.Module):
    """v(x, t) = a + t * b, independent of x: x(1) = x(0) + a + b / 2 exactly."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.a, self.b = torch.randn(SHAPE[1:]), torch.randn(SHAPE[1:])

    def forward(self, x, t, *args, **kwargs):
        return self.a.expand_as(x) + t.view(-1, 1, 1, 1, 1) * self.b


def test_solvers_integrate_from_noise_to_data():
    f = LinearField()
    eps0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    exact = eps0 + f.a + f.b / 2
    heun = sample(f, shape=SHAPE, **cond(), cfg_scale=None, steps=4, solver="heun", seed=0, shift=1)
    torch.testing.assert_close(heun, exact, atol=1e-5, rtol=1e-5)  # trapezoid: exact for linear t
    euler = sample(
        f, shape=SHAPE, **cond(), cfg_scale=None, steps=4, solver="euler", seed=0, shift=1
    )
    torch.testing.assert_close(
        euler, eps0 + f.a + f.b * 3 / 8, atol=1e-5, rtol=1e-5
    )  # left Riemann sum
    with pytest.raises(ValueError):
        sample(f, shape=SHAPE, **cond(), solver="rk4")


def test_time_grid_follows_the_models_training_shift():
    spy = Spy(make_model())
    spy.cfg = spy.cfg.replace(timestep_shift=3.0)
    sample(spy, shape=SHAPE, **cond(), steps=4, cfg_scale=None)
    grid = shift_time(torch.linspace(0, 1, 5, dtype=torch.float64), 3.0)[:-1]
    seen = torch.stack([call["t"][0] for call in spy.calls]).double()
    torch.testing.assert_close(seen, grid, atol=1e-6, rtol=0)
    assert seen[1] < 0.25 / 2  # shift 3: the first interval is much shorter than 1/4
    spy.calls.clear()
    sample(spy, shape=SHAPE, **cond(), steps=4, cfg_scale=None, shift=1.0)  # explicit override
    seen = torch.stack([call["t"][0] for call in spy.calls]).double()
    torch.testing.assert_close(seen, torch.tensor([0, 0.25, 0.5, 0.75]).double(), atol=1e-6, rtol=0)


def test_sampling_restores_training_mode():
    m = make_model().train()
    sample(m, shape=SHAPE, **cond(), steps=1)
    assert m.training
