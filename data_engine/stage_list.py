"""The curation stages, in pipeline order: the one place that lists them (docs/stages.md).

A stage runs after the ones before it (dsg reads the captions that caption writes; dedup reads
the embeddings). `--stages`, the YAML sections of the curation config, the clip table's
columns, backfill markers and the report's score columns all come from this tuple.
"""

from __future__ import annotations

from data_engine.captioning.caption import CaptionStage
from data_engine.captioning.dsg import DsgStage
from data_engine.stages.aesthetic import AestheticStage
from data_engine.stages.base import Stage
from data_engine.stages.category import CategoryStage
from data_engine.stages.cheap import ClarityStage, MotionStage, ProbeStage, SplitStage
from data_engine.stages.dedup import DedupStage
from data_engine.stages.embedding import EmbeddingStage
from data_engine.stages.ocr import OcrStage

STAGES: tuple[type[Stage], ...] = (
    ProbeStage,
    SplitStage,
    MotionStage,
    ClarityStage,
    OcrStage,
    AestheticStage,
    EmbeddingStage,
    CategoryStage,
    CaptionStage,
    DsgStage,
    DedupStage,
)


def by_name(names: list[str], stages: tuple[type[Stage], ...] = STAGES) -> list[type[Stage]]:
    """The stage classes for `names`, in pipeline order."""
    wanted = set(names)
    return [s for s in stages if s.name in wanted]
