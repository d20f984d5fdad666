"""Conditioning tasks: which frames a training sample is given, and at what frame stride.

Every application of the paper is frame replacement (docs/applications.md "Tasks"): a task
picks a window of latent frames from the prepared clip at a sub-stride, and marks which of them
are given (clean, held fixed, out of the loss). The prepared latents hold every frame at the
prepare stride (`stiv prepare` with `frame_stride: 1` for the application stages), so one table
serves every stride; the model sees the stride in source frames as its `frame_stride`
micro-condition (prepare stride x task stride). That is how one model learns keyframes (a large
stride) and fill (stride 1), and why changing the micro-condition between the two modes at
sampling time is meaningful.

    given_frames   frames held fixed in a window of F          paper's use
    none           -                                           T2V
    first          0                                           TI2V, keyframes
    first_k        0 .. k-1                                    prediction (V2V, k = 4)
    endpoints      0 and F-1                                   interpolation / fill
    every_other    0, 2, 4, ...                                temporal upsampler (TUP)
    views          0 (the input image) and the padding frames  multi-view

`views` takes the clip's frames as they are (input image, then the six views) and pads the
window to F with copies of the input image, which are given too, so a 7-frame multi-view clip
fits a temporal patch of 2 (F = 8) without the padding ever being generated or scored.

A stage lists its tasks with probabilities (`objective.tasks` in the stage YAML); each sample
draws its task independently among the tasks that fit its bucket. Plain functions, no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch

from model.config import MICRO_COND_NAMES

GIVEN_PATTERNS = ("none", "first", "first_k", "endpoints", "every_other", "views")
STRIDE_INDEX = MICRO_COND_NAMES.index("frame_stride")
PROBABILITY_TOLERANCE = 1e-6  # how far the task probabilities may sum from 1


@dataclass
class TaskSection:
    """One conditioning task of a stage (docs/applications.md "Tasks")."""

    name: str = ""  # how metrics and tests refer to it, e.g. "predict"
    probability: float = 1.0  # share of samples drawing this task (all tasks sum to 1)
    given_frames: Literal["none", "first", "first_k", "endpoints", "every_other", "views"] = (
        "none"  # which frames of the window are given (module table)
    )
    num_given_frames: int = 1  # first_k: frames given (V2V: 4)
    frame_stride: int = 1  # sub-stride over the prepared frames (keyframes: a large one)
    text_dropout: float | None = None  # None = objective.text_dropout
    image_dropout: float | None = None  # None = objective.image_dropout (given frames dropped)
    buckets: list[str] = field(default_factory=list)  # bucket keys it draws from; [] = all

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: every task needs a name")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability: must be in [0, 1], got {self.probability}")
        if self.num_given_frames < 1:
            raise ValueError("num_given_frames: must be >= 1")
        if self.frame_stride < 1:
            raise ValueError("frame_stride: must be >= 1")
        for name in ("text_dropout", "image_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name}: must be in [0, 1)")

    def span(self, num_frames: int) -> int:
        """Prepared frames a window of `num_frames` covers (views: the clip, padded)."""
        if self.given_frames == "views":
            return 1
        return (num_frames - 1) * self.frame_stride + 1


def check_tasks(tasks: list[TaskSection]) -> None:
    """Names are unique and the probabilities sum to 1; errors name the field."""
    if not tasks:
        return
    names = [t.name for t in tasks]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"objective.tasks[{i}].name: {name!r} is used twice")
    total = math.fsum(t.probability for t in tasks)
    if abs(total - 1.0) > PROBABILITY_TOLERANCE:
        shares = ", ".join(f"{t.name} {t.probability:g}" for t in tasks)
        raise ValueError(
            f"objective.tasks: the probabilities must sum to 1, got {total:g} ({shares})"
        )


def window_frames_for(bucket_frames: int, num_frames: int) -> int:
    """Frames of every training window: `objective.num_frames`, or the bucket's (0)."""
    return num_frames or bucket_frames


def tasks_for_bucket(
    tasks: list[TaskSection], bucket: str, bucket_frames: int, num_frames: int
) -> list[int]:
    """Indices of the tasks a batch of this bucket can draw: listed for it (or for every
    bucket) and with a window that fits the clip's prepared frames."""
    frames = window_frames_for(bucket_frames, num_frames)
    fit = []
    for i, task in enumerate(tasks):
        if task.buckets and bucket not in task.buckets:
            continue
        if task.given_frames == "views":
            if bucket_frames <= frames:
                fit.append(i)
        elif task.span(frames) <= bucket_frames:
            fit.append(i)
    return fit


def given_mask(task: TaskSection, num_frames: int, num_real: int | None = None) -> torch.Tensor:
    """(num_frames,) bool: the frames this task holds fixed. `num_real` (views): frames of the
    clip before the padding."""
    mask = torch.zeros(num_frames, dtype=torch.bool)
    if task.given_frames == "none" or num_frames < 2:
        return mask
    if task.given_frames == "first":
        mask[0] = True
    elif task.given_frames == "first_k":
        mask[: min(task.num_given_frames, num_frames - 1)] = True
    elif task.given_frames == "endpoints":
        mask[0] = mask[-1] = True
    elif task.given_frames == "every_other":
        mask[::2] = True
    else:  # views: the input image and the padding copies of it
        mask[0] = True
        mask[num_real if num_real is not None else num_frames :] = True
    return mask


class TaskBatch(NamedTuple):
    latents: torch.Tensor  # (B, C, F, H, W): the windows
    micro_cond: torch.Tensor  # (B, M): frame_stride = prepare stride x task stride
    given_frames: torch.Tensor | None  # (B, F) bool; None when no sample has given frames
    p_text: torch.Tensor  # (B,) text-dropout probability of each sample's task
    p_image: torch.Tensor  # (B,) image-dropout probability
    task_index: torch.Tensor  # (B,) int64 index into the stage's tasks


def draw_tasks(
    tasks: list[TaskSection], allowed: list[int], batch: int, generator: torch.Generator
) -> torch.Tensor:
    """(batch,) task indices drawn independently with the tasks' probabilities, renormalised
    over `allowed` (the tasks that fit the batch's bucket)."""
    if not allowed:
        raise ValueError("no task fits this bucket")
    weights = torch.tensor([tasks[i].probability for i in allowed], dtype=torch.float64)
    if weights.sum() <= 0:
        raise ValueError(f"tasks {[tasks[i].name for i in allowed]} all have probability 0")
    picks = torch.multinomial(weights, batch, replacement=True, generator=generator)
    return torch.tensor(allowed, dtype=torch.int64)[picks]


def build_task_batch(
    tasks: list[TaskSection],
    latents: torch.Tensor,
    micro_cond: torch.Tensor,
    *,
    bucket: str,
    num_frames: int,
    text_dropout: float,
    image_dropout: float,
    generator: torch.Generator,
) -> TaskBatch:
    """Per sample: draw a task, cut its window from the prepared latents (B, C, T, H, W) at the
    task's stride from a random start, set the stride micro-condition, and build its mask.
    Draws come from `generator` (CPU), so a resumed step draws the same tasks and windows."""
    b, _, t_src = latents.shape[:3]
    frames = window_frames_for(t_src, num_frames)
    allowed = tasks_for_bucket(tasks, bucket, t_src, num_frames)
    if not allowed:
        raise ValueError(
            f"objective.tasks: no task fits bucket {bucket} ({t_src} prepared frames, windows "
            f"of {frames}); spans: {[(t.name, t.span(frames)) for t in tasks]}"
        )
    index = draw_tasks(tasks, allowed, b, generator)
    windows, micro, masks, p_text, p_image = [], micro_cond.clone(), [], [], []
    for row, i in enumerate(index.tolist()):
        task = tasks[i]
        if task.given_frames == "views":
            real = t_src
            picks = list(range(real)) + [0] * (frames - real)
            masks.append(given_mask(task, frames, real))
        else:
            span = task.span(frames)
            start = int(torch.randint(0, t_src - span + 1, (1,), generator=generator))
            picks = [start + k * task.frame_stride for k in range(frames)]
            masks.append(given_mask(task, frames))
            micro[row, STRIDE_INDEX] = micro_cond[row, STRIDE_INDEX] * task.frame_stride
        windows.append(latents[row, :, picks])
        p_text.append(text_dropout if task.text_dropout is None else task.text_dropout)
        p_image.append(image_dropout if task.image_dropout is None else task.image_dropout)
    given = torch.stack(masks).to(latents.device)
    return TaskBatch(
        latents=torch.stack(windows),
        micro_cond=micro,
        given_frames=given if bool(given.any()) else None,
        p_text=torch.tensor(p_text, dtype=torch.float32, device=latents.device),
        p_image=torch.tensor(p_image, dtype=torch.float32, device=latents.device),
        task_index=index,
    )
