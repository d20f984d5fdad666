"""What a clip scorer looks like to the pipeline.

A scorer is a plain class: its constructor loads its model once (inside a Ray actor in the
pipeline, directly in tests), `score_clips` scores a batch of clips from their shared sampled
frames, and `provenance` says what produced the scores. The pipeline owns the Ray plumbing
(`data_engine/pipeline.py`), so scorers stay testable without Ray.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import pyarrow as pa

from data_engine.frames import ClipFrames


class StageError(RuntimeError):
    """A stage cannot start (missing weights, bad settings). The message names the config key."""


class Scorer(Protocol):
    name: ClassVar[str]
    """Stage name used by `stiv curate --stages` (e.g. "aesthetic")."""

    output_schema: ClassVar[pa.Schema]
    """The clip columns this stage writes (provenance column included)."""

    def score_clips(self, clips: list[ClipFrames]) -> list[dict[str, Any]]:
        """One dict per clip, keys exactly `output_schema.names`. Raise only for a batch-wide
        failure; a per-clip failure is reported by returning {"error": "..."} for that clip."""
        ...

    def provenance(self) -> dict[str, Any]:
        """Model name, checkpoint hash (or path + size), sampling parameters."""
        ...
