"""The LAION aesthetic head and the aesthetic scorer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from stage_helpers import make_clip, textured_frame

from data_engine.frames import even_frame_indices
from data_engine.stages.aesthetic import AestheticConfig, AestheticScorer, load_aesthetic_head
from data_engine.stages.base import StageError
from data_engine.stages.clip_model import AestheticHead, encode_frame_stacks


def test_head_layout_matches_the_published_laion_predictor():
    """`sac+logos+ava1-l14-linearMSE.pth` must load unchanged: same keys, same shapes, in order
    (improved-aesthetic-predictor's MLP: Linear/Dropout x3, Linear, Linear, under `layers.`)."""
    sizes = [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    expected = []
    for index, (out_dim, in_dim) in zip([0, 2, 4, 6, 7], sizes):
        expected.append((f"layers.{index}.weight", (out_dim, in_dim)))
        expected.append((f"layers.{index}.bias", (out_dim,)))
    got = [(k, tuple(v.shape)) for k, v in AestheticHead(768).state_dict().items()]
    assert got == expected
    dropouts = [m.p for m in AestheticHead(768).layers if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.2, 0.2, 0.1]


def test_published_style_pth_state_dict_loads(tmp_path):
    """A plain torch.save'd state dict (the published format) loads with weights intact."""
    torch.manual_seed(1)
    head = AestheticHead(768)
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head.state_dict(), path)
    loaded = load_aesthetic_head(str(path), input_dim=768)
    x = torch.nn.functional.normalize(torch.randn(3, 768), dim=-1)
    torch.testing.assert_close(loaded(x), head.eval()(x))


def test_head_errors_name_the_key(tmp_path):
    """Missing head file, or one built for another CLIP width, fails at start naming the key."""
    with pytest.raises(StageError, match=r"aesthetic\.head_path: file not found"):
        load_aesthetic_head(str(tmp_path / "missing.pth"), input_dim=768)
    path = tmp_path / "head768.pth"
    torch.save(AestheticHead(768).state_dict(), path)
    with pytest.raises(StageError, match=r"aesthetic\.head_path: head expects 768-d .* 32-d"):
        load_aesthetic_head(str(path), input_dim=32)


def test_scorer_needs_its_head(tiny_clip_cfg):
    """The scorer refuses to start without a head rather than inventing a score."""
    with pytest.raises(StageError, match=r"aesthetic\.head_path: not set"):
        AestheticScorer(AestheticConfig(clip=tiny_clip_cfg, head_path=""))


def test_scorer_is_the_mean_of_per_frame_head_outputs(tiny_clip_cfg, tiny_head_path):
    """aesthetic_score = mean over the evenly picked frames of head(normalised embedding);
    recomputed here from the parts, so a wrong aggregation or missing normalisation shows."""
    scorer = AestheticScorer(
        AestheticConfig(clip=tiny_clip_cfg, head_path=str(tiny_head_path), num_frames=3)
    )
    frames = np.stack([textured_frame(s) for s in range(7)])
    rows = scorer.score_clips([make_clip(frames), make_clip(frames[:2])])
    assert [set(r) for r in rows] == [set(AestheticScorer.output_schema.names)] * 2

    picked = frames[even_frame_indices(7, 3)]
    emb = encode_frame_stacks(scorer.model, scorer.preprocess, [picked], batch_size=8)[0]
    expected = scorer.head(torch.from_numpy(emb)).mean().item()
    assert rows[0]["aesthetic_score"] == pytest.approx(expected, abs=1e-5)
    # Deterministic: the same batch scores the same. A clip scored in a batch of its own may
    # differ in the last float bits (the matmul kernels depend on the batch shape).
    assert scorer.score_clips([make_clip(frames), make_clip(frames[:2])]) == rows
    alone = scorer.score_clips([make_clip(frames)])[0]
    assert alone["aesthetic_score"] == pytest.approx(rows[0]["aesthetic_score"], abs=1e-6)

    prov = json.loads(rows[0]["aesthetic_provenance"])
    assert prov["seeded_test_weights"] is True  # never passes for a real aesthetic score
    assert prov["clip"]["model_name"] == "stiv-tiny-clip"
    assert prov["frame_aggregation"] == "mean" and prov["num_frames"] == 3


def test_clip_without_frames_reports_an_error(tiny_clip_cfg, tiny_head_path):
    """An empty clip gets an error entry, not a default score; other clips still score."""
    scorer = AestheticScorer(AestheticConfig(clip=tiny_clip_cfg, head_path=str(tiny_head_path)))
    empty = make_clip(np.zeros((0, 90, 160, 3), np.uint8))
    rows = scorer.score_clips([empty, make_clip(np.stack([textured_frame(0)] * 2))])
    assert "error" in rows[0] and "aesthetic_score" not in rows[0]
    assert np.isfinite(rows[1]["aesthetic_score"])


def test_config_validation():
    """Bad fields fail at config load with the dotted key."""
    with pytest.raises(ValueError, match=r"aesthetic\.num_frames"):
        AestheticConfig(num_frames=-1)
    with pytest.raises(ValueError, match=r"clip\.batch_size"):
        AestheticConfig(clip={"batch_size": 0})
