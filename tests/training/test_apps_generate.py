"""`stiv generate`'s application modes on an in-memory tiny model with pixel latents (no Ray,
no training): given frames come back bit-exact, lengths are as requested, strides are the
run's, and bad requests fail in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stiv.cli import CliError, build_parser, generate_request
from stiv_core.config import ConfigError
from training.encoders import TextEncoder
from training.generate import (
    GenerateRequest,
    check_device,
    long_videos,
    multiview_videos,
    rollout_calls,
    rollout_videos,
    upsample_videos,
)

SAMPLING = {"height": 16, "width": 16, "cfg_scale": 2.0, "steps": 2, "seed": 3}


def _frames(n: int, t: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, t, 16, 16, 3), dtype=np.uint8)


def test_strides_come_from_the_runs_tasks(apps_generator) -> None:
    """Each sampling call conditions on the stride its task trained at (names first, then the
    given pattern); a mode with no task falls back to the prepare stride."""
    assert apps_generator.task_stride("t2v") == 4 and apps_generator.task_stride("predict") == 5
    assert apps_generator.task_stride("keyframe") == 7 and apps_generator.task_stride("fill") == 1
    assert apps_generator.task_stride("interpolate") == 1  # the fill task (endpoints)
    assert (
        apps_generator.task_stride("ti2v") == 7
    )  # no ti2v task: the first-frame task is keyframes
    assert apps_generator.task_stride("extend") == 5  # no extend task: the first_k task is predict


def test_prediction_interpolation_ti2v_keep_given_frames_exact(apps_generator) -> None:
    given = _frames(2, 8)
    prompts = ["a red circle moving left", "a blue square moving up"]
    for indices in ([0], [0, 7], [0, 1, 2, 3]):
        video = apps_generator.sample(prompts, frames=8, given_pixels={i: given[:, i] for i in indices},
                           frame_stride=5, **SAMPLING)  # fmt: skip
        for i in indices:
            np.testing.assert_array_equal(video[:, i], given[:, i], err_msg=f"frame {i}")


def test_upsampler_doubles_the_frames_and_keeps_the_inputs(apps_generator) -> None:
    """TUP: 5 input frames -> 10, the inputs bit-exact at the even positions, every odd
    position generated (windows of 4 overlapping by 2)."""
    low = _frames(2, 5, seed=1)
    high = upsample_videos(apps_generator, ["a", "b"], low, window=4, **SAMPLING)
    assert high.shape == (2, 10, 16, 16, 3)
    np.testing.assert_array_equal(high[:, 0::2], low)
    assert all(high[:, i].any() for i in range(1, 10, 2))
    with pytest.raises(ValueError, match="fewer than one window"):
        upsample_videos(apps_generator, ["a"], low[:1, :1], window=4, **SAMPLING)


@pytest.mark.parametrize(("keyframes", "gap"), [(2, 7), (4, 3), (6, 5)])
def test_long_video_has_the_requested_length_and_exact_keyframes(
    apps_generator, keyframes, gap
) -> None:
    """(N - 1) * S + 1 frames; the first frame is the given one and every S-th frame is the
    keyframe sampled first (the fill windows hold them fixed)."""
    first = _frames(1, 1, seed=2)[:, 0]
    video = long_videos(apps_generator, ["a green circle moving right"], first, keyframes=keyframes,
                        gap=gap, **SAMPLING)  # fmt: skip
    assert video.shape[1] == (keyframes - 1) * gap + 1
    request = GenerateRequest(checkpoint="x", prompt="p", mode="long", keyframes=keyframes,
                              keyframe_stride=gap)  # fmt: skip
    assert request.output_frames == video.shape[1]
    np.testing.assert_array_equal(video[:, 0], first)
    keys = apps_generator.sample(["a green circle moving right"], frames=keyframes, given_pixels={0: first},
                      frame_stride=7, **SAMPLING)  # fmt: skip
    np.testing.assert_array_equal(video[:, ::gap], keys)


def test_rollout_and_multiview(apps_generator) -> None:
    """Rollout keeps its context and reaches the length in the counted calls; multi-view keeps
    the input view as frame 0 and returns it plus six views."""
    context = _frames(1, 4, seed=4)
    video = rollout_videos(apps_generator, ["a"], context, 22, window=8, **SAMPLING)
    assert video.shape[1] == 22 and rollout_calls(22, 4, 8) == 5
    np.testing.assert_array_equal(video[:, :4], context)
    view = _frames(2, 1, seed=5)[:, 0]
    views = multiview_videos(
        apps_generator, ["a red and blue cube"] * 2, view, window=8, **SAMPLING
    )
    assert views.shape == (2, 7, 16, 16, 3)
    np.testing.assert_array_equal(views[:, 0], view)


def test_requests_check_their_inputs() -> None:
    """Each mode names the flag it misses or does not take; no mode infers as before."""
    assert GenerateRequest(checkpoint="c", prompt="p").mode == "t2v"
    assert GenerateRequest(checkpoint="c", prompt="p", image="a.png").mode == "ti2v"
    assert GenerateRequest(checkpoint="c", prompt="p", video="v.mp4").mode == "predict"
    cases = {
        ("ti2v", ()): "needs --image",
        ("upsample", ()): "needs --video",
        ("multiview", ("video",)): "needs --image",
        ("t2v", ("image",)): "does not take --image",
        ("predict", ("video", "image")): "does not take --image",
    }
    for (mode, inputs), message in cases.items():
        with pytest.raises(ValueError, match=message):
            GenerateRequest(checkpoint="c", prompt="p", mode=mode, **dict.fromkeys(inputs, "x"))
    with pytest.raises(ValueError, match="--mode: must be one of"):
        GenerateRequest(checkpoint="c", prompt="p", mode="slowmo")
    with pytest.raises(ValueError, match="--keyframes"):
        GenerateRequest(checkpoint="c", prompt="p", mode="long", keyframes=1)


def test_cli_defaults_are_the_requests() -> None:
    """`stiv generate` without a flag takes GenerateRequest's default (the CLI used to say 4
    given frames where the request said 1)."""
    args = build_parser().parse_args(["generate", "--checkpoint", "c", "--prompt", "p"])
    request = generate_request(args)
    default = GenerateRequest(checkpoint="c", prompt="p")
    assert request == default and request.given_frames == 4
    args = build_parser().parse_args(
        ["generate", "--checkpoint", "c", "--prompt", "p", "--mode", "long", "--keyframes",
         "4", "--keyframe-stride", "7", "--device", "cpu"]
    )  # fmt: skip
    request = generate_request(args)
    assert (request.mode, request.output_frames, request.device) == ("long", 22, "cpu")
    with pytest.raises(CliError, match="needs --image"):
        generate_request(
            build_parser().parse_args(
                ["generate", "--checkpoint", "c", "--prompt", "p", "--mode", "multiview"]
            )
        )


def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    assert check_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert check_device("cuda") == "cuda"
    else:
        with pytest.raises(ConfigError, match="--device cuda: no CUDA device"):
            check_device("cuda")


def test_tiny_text_vocabulary_covers_the_multiview_captions(tmp_path) -> None:
    """training/ cannot import demos/, so the multi-view caption words are written out in
    training/encoders.py: they must cover the renderer's, each one token."""
    from demos.multiview import MULTIVIEW_CAPTION_WORDS as RENDERER_WORDS
    from training.encoders import MULTIVIEW_CAPTION_WORDS, write_tiny_models

    assert set(RENDERER_WORDS) <= set(MULTIVIEW_CAPTION_WORDS)
    text = TextEncoder(write_tiny_models(tmp_path)["text"], "text", 16)
    for word in RENDERER_WORDS:
        assert len(text.tokenizer.tokenize(word)) == 1, word
