"""The stages of the streaming pass over each video: probe, split, and the cheap CPU scores.

probe and split run once per new video inside `data_engine.scan` (one decode feeds both and the
frame sampler); motion and clarity score each clip right where its frames are sampled, so their
frames never leave the task. The compute lives in `data_engine.video`, `data_engine.split` and
`data_engine.cheap_scores`; these classes declare what each stage reads and writes.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pyarrow as pa

from data_engine.schema import CLIP_CORE_SCHEMA, VIDEO_SCHEMA
from data_engine.split import SplitConfig
from data_engine.stages.base import ClipInput, Stage, score_each


class ProbeStage(Stage):
    """Reads a video URI; writes the `videos` row (metadata, status). Unreadable -> quarantine."""

    name: ClassVar[str] = "probe"
    runs_on: ClassVar[str] = "video"
    reads: ClassVar[tuple[str, ...]] = ("uri",)

    @classmethod
    def output_schema(cls, cfg: Any) -> pa.Schema:
        return VIDEO_SCHEMA


class SplitStage(Stage):
    """Reads every decoded frame (small, for the detectors); writes the clip ranges."""

    name: ClassVar[str] = "split"
    runs_on: ClassVar[str] = "video"
    reads: ClassVar[tuple[str, ...]] = ("uri",)
    sections: ClassVar[dict[str, type]] = {"split": SplitConfig}

    @classmethod
    def output_schema(cls, cfg: Any) -> pa.Schema:
        return CLIP_CORE_SCHEMA


class MotionStage(Stage):
    """Reads sampled frames and their pairs; writes motion_score (percent of the short side per
    second, mean Farneback flow) and motion_provenance."""

    name: ClassVar[str] = "motion"
    runs_on: ClassVar[str] = "task"
    reads: ClassVar[tuple[str, ...]] = ("frames", "pairs")

    @classmethod
    def output_schema(cls, cfg: Any) -> pa.Schema:
        # Scores are float32: half the bytes a filter scans, and ample precision for a score.
        return pa.schema([("motion_score", pa.float32()), ("motion_provenance", pa.string())])

    def setup(self) -> None:
        from data_engine.cheap_scores import provenance

        self.provenance = json.dumps(provenance()["motion_score"], sort_keys=True)

    def __call__(self, batch: list[ClipInput]) -> list[dict[str, Any]]:
        from data_engine.cheap_scores import motion_score

        return score_each(
            batch,
            lambda item: {
                "motion_score": motion_score(item.frames),
                "motion_provenance": self.provenance,
            },
        )


class ClarityStage(Stage):
    """Reads sampled frames; writes clarity_score (Laplacian variance at a 256 px short side)
    and clarity_provenance."""

    name: ClassVar[str] = "clarity"
    runs_on: ClassVar[str] = "task"

    @classmethod
    def output_schema(cls, cfg: Any) -> pa.Schema:
        return pa.schema([("clarity_score", pa.float32()), ("clarity_provenance", pa.string())])

    def setup(self) -> None:
        from data_engine.cheap_scores import provenance

        self.provenance = json.dumps(provenance()["clarity_score"], sort_keys=True)

    def __call__(self, batch: list[ClipInput]) -> list[dict[str, Any]]:
        from data_engine.cheap_scores import clarity_score

        return score_each(
            batch,
            lambda item: {
                "clarity_score": clarity_score(item.frames),
                "clarity_provenance": self.provenance,
            },
        )
