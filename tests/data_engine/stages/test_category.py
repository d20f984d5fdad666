"""Zero-shot category from CLIP prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from stage_helpers import make_clip, textured_frame

from data_engine.stages.category import CategoryConfig, CategoryScorer, softmax
from data_engine.stages.clip_config import normalize_rows
from data_engine.stages.clip_model import encode_frame_stacks, encode_texts


def test_category_is_the_argmax_of_prompt_similarity(tiny_clip_cfg):
    """The chosen label and its probability are recomputed from the encoders directly."""
    labels = ["a dog", "a beach", "a city", "a car"]
    cfg = CategoryConfig(clip=tiny_clip_cfg, labels=labels, prompt_template="a photo of {}.")
    scorer = CategoryScorer(cfg)
    frames = np.stack([textured_frame(s) for s in range(3)])
    row = scorer.score_clips([make_clip(frames)])[0]
    assert set(row) == set(CategoryScorer.output_schema.names)

    from data_engine.stages.clip_model import load_clip_from_config

    model, preprocess, tokenizer, _ = load_clip_from_config(tiny_clip_cfg, "x")
    text = encode_texts(model, tokenizer, [f"a photo of {label}." for label in labels])
    image = normalize_rows(
        encode_frame_stacks(model, preprocess, [frames], 8)[0].mean(0, keepdims=True)
    )
    probs = softmax(model.logit_scale.exp().item() * image @ text.T)[0]
    assert row["category"] == labels[int(np.argmax(probs))]
    assert row["category_score"] == pytest.approx(float(probs.max()), abs=1e-5)
    assert 1 / len(labels) <= row["category_score"] <= 1.0
    prov = json.loads(row["category_provenance"])
    assert prov["labels"] == labels and prov["prompt_template"] == "a photo of {}."


def test_config_validation():
    """A template without a slot or a single label is a config error, caught at load."""
    with pytest.raises(ValueError, match=r"category\.prompt_template"):
        CategoryConfig(prompt_template="a photo")
    with pytest.raises(ValueError, match=r"category\.labels"):
        CategoryConfig(labels=["only"])
    with pytest.raises(ValueError, match=r"category\.labels"):
        CategoryConfig(labels=["a", "a"])
