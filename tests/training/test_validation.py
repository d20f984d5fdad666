"""Validation samples during training: files and TensorBoard images, and memory freed after."""

from __future__ import annotations

import resource

import pytest
import torch

from data_engine.store import Database
from model.config import get_preset
from model.network import STIV
from training.checkpoint import NULL_TEXT_FILE, latest_checkpoint
from training.validation import EvalSection, Validator


@pytest.mark.slow
def test_validation_writes_samples_and_frees_its_memory(relative_run, tmp_path):
    """Ten validations of the same EMA weights: each writes one MP4 + PNG strip per prompt and
    a TensorBoard image; the process's memory peak after the tenth equals the peak after the
    first, up to a one-time allocator warm-up below half a model (the sampling model and its
    tensors are freed, finetrainers#295)."""
    from safetensors.torch import load_file
    from torch.utils.tensorboard import SummaryWriter

    meta = Database(relative_run["db"]).table("latents_meta").to_table().to_pylist()[0]
    null = load_file(str(latest_checkpoint(relative_run["run"]) / NULL_TEXT_FILE))
    null = (null["tokens"], null["mask"], null["pooled"])
    cfg = get_preset("stiv-tiny-cpu", in_channels=12, text_dim=32, max_text_tokens=16)
    ema = {k: v.clone() for k, v in STIV(cfg).state_dict().items()}
    eval_cfg = EvalSection(every_steps=1, prompts=["a red square", "a blue square"], steps=3)
    validator = Validator(eval_cfg, cfg, meta, null, tmp_path, (8, 32, 32))
    writer = SummaryWriter(str(tmp_path / "tensorboard"))
    peaks = []
    for step in range(1, 11):
        out = validator(ema, step, writer)
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB
    writer.close()
    assert sorted(p.name for p in out.iterdir()) == [
        "prompt_0.mp4", "prompt_0.png", "prompt_1.mp4", "prompt_1.png"
    ]  # fmt: skip
    assert len(list((tmp_path / "validation").iterdir())) == 10
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    model_kib = sum(v.numel() * 4 for v in ema.values()) / 1024
    # A leaked model would add a model size per call. Measured here: the first few calls add
    # 0.6-4.6 MB in all (the MP4 encoder's and the allocator's warm-up, under a third of the
    # 14 MB model), then the peak stays the same through the tenth.
    assert peaks[-1] - peaks[0] < 0.5 * model_kib, (peaks, model_kib)
    assert peaks[-1] - peaks[4] < 0.05 * model_kib, (peaks, model_kib)
    assert validator.generator.model is None and torch.is_grad_enabled()
