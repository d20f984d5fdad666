"""The tiny model overfits one batch (loss falls by 10x in a few hundred CPU steps)."""

import time

import pytest
import torch

from model.config import get_preset
from model.flow import first_frames_mask, training_loss
from model.network import STIV


@pytest.mark.parametrize("predict_clean", [False, True])
def test_tiny_model_overfits_one_batch(predict_clean):
    torch.manual_seed(0)
    model = STIV(get_preset("stiv-tiny", predict_clean=predict_clean)).train()
    g = torch.Generator().manual_seed(0)
    b = 2
    x1 = torch.randn(b, 4, 4, 8, 8, generator=g)
    noise = torch.randn(b, 4, 4, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.7])
    tokens, mask = torch.randn(b, 5, 16, generator=g), torch.ones(b, 5, dtype=torch.bool)
    pooled, micro = torch.randn(b, 16, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64, 3]] * b)
    given = first_frames_mask(b, 4)  # TI2V batch: frame 0 replaced and out of the loss
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    start = time.perf_counter()
    losses = []
    for _ in range(300):
        loss, _ = training_loss(
            model, x1, tokens, mask, pooled, micro, given_frames=given, t=t, noise=noise
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 20:
            break
    elapsed = time.perf_counter() - start
    assert min(losses) < losses[0] / 10, (losses[0], min(losses), len(losses))
    assert elapsed < 60
