"""Conditioning tasks (training/tasks.py): windows, strides, masks, the all-tasks sampler and
the stage-config checks, without Ray."""

from __future__ import annotations

import pytest
import torch

from stiv_core.config import ConfigError, load_config
from training.config import ObjectiveSection
from training.plan import check_tasks_fit
from training.tasks import (
    STRIDE_INDEX,
    TaskSection,
    build_task_batch,
    draw_tasks,
    given_mask,
    tasks_for_bucket,
)


def _task(name: str, given: str = "none", stride: int = 1, p: float = 1.0, **kw) -> TaskSection:
    return TaskSection(name=name, probability=p, given_frames=given, frame_stride=stride, **kw)


def test_given_masks_of_every_pattern() -> None:
    """Each application holds the frames docs/applications.md names, in a window of 8."""
    expect = {
        "none": [],
        "first": [0],
        "first_k": [0, 1, 2, 3],
        "endpoints": [0, 7],
        "every_other": [0, 2, 4, 6],
    }
    for pattern, frames in expect.items():
        mask = given_mask(_task("t", pattern, num_given_frames=4), 8)
        assert torch.nonzero(mask).flatten().tolist() == frames, pattern
    views = given_mask(_task("mv", "views"), 8, num_real=7)  # input + 6 views + 1 padding
    assert torch.nonzero(views).flatten().tolist() == [0, 7]


def _source(batch: int = 6, frames: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents whose every element encodes its frame index, and micro-conditions at stride 1."""
    latents = torch.arange(frames, dtype=torch.float32).view(1, 1, frames, 1, 1)
    latents = latents.expand(batch, 3, frames, 2, 2).clone()
    micro = torch.tensor([[32.0, 32, 0, 0, 32, 32, 1]] * batch)
    return latents, micro


def test_windows_are_the_prepared_frames_at_the_task_stride() -> None:
    """A keyframe window at stride 7 is 8 prepared frames 7 apart (50 frames: the start is 0),
    copied exactly, and the model sees stride 7 as its frame_stride micro-condition; a fill
    window is 8 consecutive frames at stride 1."""
    latents, micro = _source()
    gen = torch.Generator().manual_seed(0)
    for task, stride in ((_task("keyframe", "first", 7), 7), (_task("fill", "endpoints", 1), 1)):
        out = build_task_batch([task], latents, micro, bucket="f50x32x32", num_frames=8,
                               text_dropout=0.1, image_dropout=0.0, generator=gen)  # fmt: skip
        assert out.latents.shape == (6, 3, 8, 2, 2)
        frame_ids = out.latents[:, 0, :, 0, 0]
        assert torch.equal(frame_ids[:, 1:] - frame_ids[:, :-1], torch.full((6, 7), float(stride)))
        assert (frame_ids[:, 0] >= 0).all() and (frame_ids[:, -1] <= 49).all()
        assert (out.micro_cond[:, STRIDE_INDEX] == stride).all()
        assert torch.equal(out.micro_cond[:, :STRIDE_INDEX], micro[:, :STRIDE_INDEX])
    # The stride multiplies the prepared one (a table prepared at stride 2 gives 14).
    out = build_task_batch([_task("keyframe", "first", 7)], latents, micro * 2, bucket="f50x32x32",
                           num_frames=8, text_dropout=0.1, image_dropout=0.0, generator=gen)  # fmt: skip
    assert (out.micro_cond[:, STRIDE_INDEX] == 14).all()


def test_views_pad_the_clip_with_given_copies_of_the_input() -> None:
    """A 7-frame multi-view clip becomes 8 frames (temporal patch 2): the input image, the six
    views in order, then the input again, given."""
    latents, micro = _source(batch=2, frames=7)
    out = build_task_batch([_task("multiview", "views")], latents, micro, bucket="f7x32x32",
                           num_frames=8, text_dropout=0.1, image_dropout=0.0,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.latents[0, 0, :, 0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0]
    assert torch.nonzero(out.given_frames[0]).flatten().tolist() == [0, 7]


def test_per_task_dropout_and_buckets() -> None:
    """A task's own text/image dropout overrides the stage's; a task bound to a bucket is not
    drawn for another, and windows longer than the clip are not drawn."""
    tasks = [
        _task("predict", "first_k", 5, p=0.5, num_given_frames=4, text_dropout=0.3),
        _task("multiview", "views", p=0.5, buckets=["f7x32x32"], image_dropout=0.0),
    ]
    assert tasks_for_bucket(tasks, "f50x32x32", 50, 8) == [0]
    assert tasks_for_bucket(tasks, "f7x32x32", 7, 8) == [1]
    assert tasks_for_bucket(tasks, "f20x32x32", 20, 8) == []  # 36 frames needed at stride 5
    latents, micro = _source(batch=4)
    out = build_task_batch(tasks, latents, micro, bucket="f50x32x32", num_frames=8,
                           text_dropout=0.1, image_dropout=0.08,
                           generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert out.task_index.tolist() == [0, 0, 0, 0]
    assert torch.allclose(out.p_text, torch.full((4,), 0.3))
    assert torch.allclose(out.p_image, torch.full((4,), 0.08))


def test_all_tasks_sampler_draws_each_task_at_its_rate() -> None:
    """Statistical check of the all-tasks draw: 40,000 samples, each task's share within 0.01
    of its configured probability (the largest binomial std here is sqrt(0.4*0.6/40000) =
    0.0024, so 0.01 is over 4 sigma: a correct sampler fails about once in 30,000 runs)."""
    probs = [0.4, 0.3, 0.2, 0.1]
    tasks = [_task(f"t{i}", p=p) for i, p in enumerate(probs)]
    drawn = draw_tasks(tasks, [0, 1, 2, 3], 40_000, torch.Generator().manual_seed(7))
    shares = torch.bincount(drawn, minlength=4).double() / len(drawn)
    for share, p in zip(shares.tolist(), probs):
        assert abs(share - p) < 0.01, (shares, probs)
    # Renormalised over the tasks that fit: t1 and t3 only -> 0.75 / 0.25.
    drawn = draw_tasks(tasks, [1, 3], 40_000, torch.Generator().manual_seed(8))
    assert abs(float((drawn == 1).double().mean()) - 0.75) < 0.01


def test_stage_config_checks_name_the_field() -> None:
    """Probabilities that do not sum to 1, a repeated name, a bad probability, a legacy
    given_frames beside tasks: each fails at load time with the field in the message."""

    def load(objective: dict) -> ObjectiveSection:
        return load_config(ObjectiveSection, base=objective)

    ok = load({"num_frames": 8, "tasks": [{"name": "a", "probability": 0.25},
                                          {"name": "b", "probability": 0.75}]})  # fmt: skip
    assert [t.name for t in ok.tasks] == ["a", "b"]
    with pytest.raises(ConfigError, match=r"objective\.tasks: the probabilities must sum to 1"):
        load({"tasks": [{"name": "a", "probability": 0.5}, {"name": "b", "probability": 0.4}]})
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.name"):
        load({"tasks": [{"name": "a", "probability": 0.5}, {"name": "a", "probability": 0.5}]})
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.probability"):
        load({"tasks": [{"name": "a", "probability": 1.5}]})
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.given_frames"):
        load({"tasks": [{"name": "a", "given_frames": "middle"}]})
    with pytest.raises(ConfigError, match=r"objective\.given_frames"):
        load({"given_frames": "first", "tasks": [{"name": "a"}]})


def test_a_table_too_short_for_every_task_is_refused_before_training() -> None:
    """Keyframes at stride 7 need 50 prepared frames; a table of 8-frame clips is refused with
    the bucket and the spans named."""
    objective = ObjectiveSection(num_frames=8, tasks=[_task("keyframe", "first", 7)])
    check_tasks_fit(objective, ["f50x32x32"])
    with pytest.raises(ConfigError, match=r"no task fits bucket f8x32x32.*'keyframe': 50"):
        check_tasks_fit(objective, ["f8x32x32"])
