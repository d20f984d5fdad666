"""The shared open_clip loader and frame preprocessor."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from stage_helpers import make_clip, textured_frame

from data_engine.frames import even_frame_indices
from data_engine.stages.base import StageError
from data_engine.stages.clip_config import clip_embed_dim
from data_engine.stages.clip_model import (
    FramePreprocessor,
    encode_frame_stacks,
    load_clip_from_config,
    load_open_clip,
)
from demos.tiny_models import make_tiny_open_clip


def test_tiny_checkpoint_round_trips_through_the_user_loader(tiny_clip_cfg):
    """The tiny model is written to disk and loaded back by the same path real weights take,
    and its provenance marks it as seeded test weights with a content hash."""
    model, _preprocess, tokenizer, prov = load_clip_from_config(tiny_clip_cfg, "embedding.clip")
    assert prov["model_name"] == "stiv-tiny-clip"
    assert prov["seeded_test_weights"] is True
    assert len(prov["checkpoint_sha256"]) == 16
    assert prov["checkpoint_bytes"] > 0
    state = model.state_dict()
    from safetensors.torch import load_file

    saved = load_file(tiny_clip_cfg.checkpoint_path)
    for key, value in saved.items():
        torch.testing.assert_close(state[key], value)  # weights really came from the file
    assert tokenizer(["a dog"]).shape == (1, 16)


def test_same_seed_same_bytes_and_embeddings(tmp_path, tiny_clip_cfg):
    """Seeded builds are reproducible, so demo and test scores are deterministic across runs."""
    _, checkpoint, _ = make_tiny_open_clip(tmp_path, seed=0)
    _, _, _, prov_a = load_clip_from_config(tiny_clip_cfg, "x")
    model, preprocess, _, prov_b = load_open_clip(
        "stiv-tiny-clip",
        str(checkpoint),
        config_key="x",
        model_config_path=tiny_clip_cfg.model_config_path,
    )
    assert prov_a["checkpoint_sha256"] == prov_b["checkpoint_sha256"]
    frames = np.stack([textured_frame(s) for s in range(3)])
    first = encode_frame_stacks(model, preprocess, [frames], batch_size=2)[0]
    second = encode_frame_stacks(model, preprocess, [frames], batch_size=8)[0]
    np.testing.assert_allclose(first, second, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)


def test_missing_checkpoint_names_the_config_key(tmp_path, tiny_clip_cfg):
    """Without weights a stage must fail at start and say which key to set, never fall back."""
    with pytest.raises(StageError, match=r"aesthetic\.clip\.checkpoint_path: file not found"):
        load_open_clip("ViT-L-14", str(tmp_path / "nope.bin"), config_key="aesthetic.clip")
    with pytest.raises(StageError, match=r"embedding\.clip\.checkpoint_path: not set"):
        load_open_clip("ViT-B-32", "", config_key="embedding.clip")
    with pytest.raises(StageError, match=r"x\.model_config_path: file not found"):
        load_open_clip(
            "stiv-tiny-clip",
            tiny_clip_cfg.checkpoint_path,
            config_key="x",
            model_config_path=str(tmp_path / "missing.json"),
        )


def test_checkpoint_of_another_architecture_is_rejected(tmp_path, tiny_clip_cfg):
    """Pointing ViT-B-32 at the tiny checkpoint must fail loudly, naming the key."""
    with pytest.raises(StageError, match=r"c\.checkpoint_path: .* does not fit 'ViT-B-32'"):
        load_open_clip("ViT-B-32", tiny_clip_cfg.checkpoint_path, config_key="c")


def test_real_architectures_are_known_offline():
    """ViT-L-14 (LAION aesthetic head) and ViT-B-32 resolve from bundled configs, no hub."""
    assert clip_embed_dim("ViT-L-14") == 768
    assert clip_embed_dim("ViT-B-32") == 512
    with pytest.raises(StageError):
        clip_embed_dim("no-such-model")


def test_preprocessor_matches_open_clip_pil_pipeline():
    """Our batched torch preprocessing must feed the model what open_clip's own PIL transform
    would, or real checkpoints would see shifted statistics."""
    cfg = {
        "size": 224,
        "mean": open_clip.OPENAI_DATASET_MEAN,
        "std": open_clip.OPENAI_DATASET_STD,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    frame = textured_frame(3, height=360, width=640)
    ours = FramePreprocessor(cfg)(frame[None])[0]
    theirs = image_transform_v2(PreprocessCfg(**cfg), is_train=False)(Image.fromarray(frame))
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert (ours - theirs).abs().mean() < 0.02  # in normalised units (~0.5% of the range)


def test_preprocessor_normalises_a_flat_frame_exactly():
    """A uniform frame must come out as (v/255 - mean) / std in every pixel, any size."""
    cfg = {"size": 64, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
    frames = np.full((2, 90, 160, 3), 128, np.uint8)
    out = FramePreprocessor(cfg)(frames)
    assert out.shape == (2, 3, 64, 64)
    expected = (128 / 255 - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), expected, atol=1e-4, rtol=0)


def test_even_frame_indices_boundaries():
    """0 or >= available means all frames; otherwise the first and last are both included."""
    assert even_frame_indices(5, 0).tolist() == [0, 1, 2, 3, 4]
    assert even_frame_indices(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert even_frame_indices(5, 9).tolist() == [0, 1, 2, 3, 4]
    assert even_frame_indices(9, 3).tolist() == [0, 4, 8]
    assert even_frame_indices(0, 3).tolist() == []


def test_stacks_of_different_sizes_encode_together(tiny_clip_cfg):
    """Clips from different videos (different frame sizes and counts) share one batch."""
    model, preprocess, _, _ = load_clip_from_config(tiny_clip_cfg, "x")
    a = make_clip(np.stack([textured_frame(1, 180, 320)] * 3)).frames
    b = make_clip(np.stack([textured_frame(2, 320, 180)] * 2)).frames
    out = encode_frame_stacks(model, preprocess, [a, b, a[:0]], batch_size=4)
    assert [e.shape for e in out] == [(3, 32), (2, 32), (0, 32)]
