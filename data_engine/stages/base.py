"""The stage contract: what every curation stage declares and does (docs/stages.md).

A stage is one class. Its `name` is its `--stages` word and its YAML section (`sections` lists
its config dataclasses when it has any); `reads` names the clip inputs it needs (`frames`, `pairs`
(each frame's optical-flow partner), or columns such as `caption`); `runs_on` says where it runs:

- `"video"`: inside the one streaming pass over each video (probe, split);
- `"task"`: per clip inside that same pass, right after the clip's frames are sampled (cheap
  CPU scores: no model to load, no frames shipped anywhere);
- `"actor"`: in a Ray actor pool that loads the stage's model once (`setup`) and scores batches;
- `"table"`: one pass over the whole clips table after every video is written (dedup).

`output_schema(cfg)` lists the clip columns the stage writes; its first column marks a clip as
done for backfill (null = not yet scored). `check_ready(cfg)` runs before any work starts and
raises `StageError` naming the config key that is wrong. `__call__(batch)` returns one dict per
clip; a clip that cannot be scored gets `{"error": "..."}`, which is recorded on that clip only.

This module imports nothing heavy: loading a curation config must stay cheap (a stage imports
torch, open_clip or rapidocr in `setup`, never at module level).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

from data_engine.frames import ClipFrames

RUNS_ON = ("video", "task", "actor", "table")


class StageError(RuntimeError):
    """A stage cannot start (missing weights, bad settings). The message names the config key."""


@dataclass
class StageResources:
    """Ray resources of one stage (`resources.<stage>` in YAML). 0 means: use the global
    `resources.*` default, or derive it from the cluster (`ray.cluster_resources()`)."""

    actors: int = 0  # actor-pool size, min == max so the pool starts full (actor stages)
    cpus: float = 0.0  # CPUs reserved per actor (actor stages)
    gpus: float = 0.0  # GPUs per actor; 0 = resources.gpus_per_model_actor
    batch_size: int = 0  # clips per call; 0 = resources.model_batch_size

    def __post_init__(self) -> None:
        if self.actors < 0:
            raise ValueError("actors: must be >= 0 (0 = auto)")
        if self.cpus < 0:
            raise ValueError("cpus: must be >= 0 (0 = auto)")
        if self.gpus < 0:
            raise ValueError("gpus: must be >= 0")
        if self.batch_size < 0:
            raise ValueError("batch_size: must be >= 0 (0 = resources.model_batch_size)")


@dataclass(frozen=True)
class ClipInput:
    """What a stage gets for one clip: its columns so far and its sampled frames (None when
    the stage does not read frames)."""

    row: dict[str, Any]
    frames: ClipFrames | None


class Stage:
    """Base class of every curation stage (see the module docstring for the contract)."""

    name: ClassVar[str]
    runs_on: ClassVar[str]
    reads: ClassVar[tuple[str, ...]] = ("frames",)
    sections: ClassVar[dict[str, type]] = {}  # YAML section name -> config dataclass

    def __init__(self, cfg: Any) -> None:
        """Keeps the curation config; loads nothing (that is `setup`'s job, once per worker)."""
        self.cfg = cfg

    # -- declared -------------------------------------------------------------------------
    @classmethod
    def output_schema(cls, cfg: Any) -> pa.Schema:
        """Clip columns this stage writes; the first one marks a clip as done (non-null)."""
        raise NotImplementedError(f"{cls.__name__}.output_schema")

    @classmethod
    def marker_column(cls, cfg: Any) -> str:
        return cls.output_schema(cfg).names[0]

    @classmethod
    def check_ready(cls, cfg: Any) -> None:
        """Raise StageError naming the config key when this stage cannot start."""

    @classmethod
    def todo_filter(cls, cfg: Any) -> str:
        """Lance filter of the clips a backfill of this stage must (re)do."""
        return f"{cls.marker_column(cfg)} IS NULL"

    # -- lifecycle ------------------------------------------------------------------------
    def setup(self) -> None:
        """Load models, open clients (once per worker)."""

    def __call__(self, batch: list[ClipInput]) -> list[dict[str, Any]]:
        """One result per clip: the output columns, or {"error": "..."} for that clip."""
        raise NotImplementedError(f"{type(self).__name__}.__call__")

    def teardown(self) -> None:
        """Free what `setup` took (clients, GPU memory)."""


def score_each(batch: list[ClipInput], score: Any) -> list[dict[str, Any]]:
    """Run `score(clip_input) -> dict` on every clip, turning one clip's exception into that
    clip's error, so a bad clip never fails its batch or its video."""
    results = []
    for item in batch:
        try:
            results.append(score(item))
        except Exception as err:  # recorded on the clip, becomes a quarantine row
            results.append({"error": f"{type(err).__name__}: {err}"})
    return results


def score_frames_or_each(batch: list[ClipInput], score_clips: Any) -> list[dict[str, Any]]:
    """`score_clips(list[ClipFrames])` on the whole batch (a model's batched forward pass);
    when the batch raises, each clip is retried alone so only the bad clip records the error."""
    todo = [i for i, item in enumerate(batch) if item.frames is not None]
    results: list[dict[str, Any]] = [
        {} if item.frames is not None else {"error": "no sampled frames"} for item in batch
    ]
    if not todo:
        return results
    try:
        scored = score_clips([batch[i].frames for i in todo])
    except Exception:
        scored = score_each([batch[i] for i in todo], lambda item: score_clips([item.frames])[0])
    for i, result in zip(todo, scored):
        results[i] = result
    return results
