"""The curation config: one typed dataclass tree, serialised as `pipelines/curate*.yaml`.

`load_curate_config(path, overrides)` validates everything (stage names included) before any
work starts; each error names its field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data_engine.captioning import CaptionConfig, DSGQuestionsConfig, DSGVerifyConfig
from data_engine.split import SplitConfig
from data_engine.stages.aesthetic import AestheticConfig
from data_engine.stages.category import CategoryConfig
from data_engine.stages.dedup import DedupConfig
from data_engine.stages.embedding import EmbeddingConfig
from data_engine.stages.ocr import OcrConfig
from data_engine.video import SamplingConfig
from stiv.config import ConfigError, load_config

# Order matters: a stage runs after the ones before it (dsg reads captions).
CHEAP_STAGES = ("probe", "split", "motion", "clarity")
MODEL_STAGES = ("ocr", "aesthetic", "embedding", "category", "caption", "dsg")
TABLE_STAGES = ("dedup",)  # run over the written clips table, after all videos
ALL_STAGES = (*CHEAP_STAGES, *MODEL_STAGES, *TABLE_STAGES)


@dataclass
class ResourcesConfig:
    """Ray resources per stage. 0 means: derive from the cluster (`ray.cluster_resources()`)."""

    cpus_per_task: float = 1.0  # CPUs reserved by each probe/split/sample task
    model_actors: int = 0  # actors per model stage (min == max, so pools start full); 0 = auto
    cpus_per_model_actor: float = (
        0.0  # CPUs reserved by each model actor; 0 = auto (fits all pools)
    )
    gpus_per_model_actor: float = 0.0  # GPUs per model actor (0 on CPU machines)
    model_batch_size: int = 8  # clips per model batch
    memory_per_task_mb: int = 0  # memory hint per task (MiB); 0 = no hint

    def __post_init__(self) -> None:
        if self.cpus_per_task <= 0:
            raise ValueError("resources.cpus_per_task: must be > 0")
        if self.model_actors < 0:
            raise ValueError("resources.model_actors: must be >= 0")
        if self.cpus_per_model_actor < 0:
            raise ValueError("resources.cpus_per_model_actor: must be >= 0 (0 = auto)")
        if self.gpus_per_model_actor < 0:
            raise ValueError("resources.gpus_per_model_actor: must be >= 0")
        if self.model_batch_size < 1:
            raise ValueError("resources.model_batch_size: must be >= 1")
        if self.memory_per_task_mb < 0:
            raise ValueError("resources.memory_per_task_mb: must be >= 0")


@dataclass
class CurateConfig:
    """Everything `stiv curate` does, in one place."""

    stages: list[str] = field(default_factory=lambda: list(CHEAP_STAGES))
    # Stages to run, in pipeline order (`--stages` overrides). probe and split always run for
    # new videos; without INPUTs the listed scoring stages are backfilled on existing clips.
    videos_per_commit: int = 16  # videos processed and committed together (resume granularity)
    max_attempts: int = 3  # tries per video before it stays quarantined
    probe_timeout_s: float = 120.0  # budget for opening + probing one video (seconds)
    storage_options: dict[str, str] = field(default_factory=dict)
    # Lance/object-store options (endpoint, region, ...); credentials come from the environment.
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    ocr: OcrConfig = field(default_factory=OcrConfig)
    aesthetic: AestheticConfig = field(default_factory=AestheticConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    category: CategoryConfig = field(default_factory=CategoryConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    dsg_questions: DSGQuestionsConfig = field(default_factory=DSGQuestionsConfig)
    dsg_verify: DSGVerifyConfig = field(default_factory=DSGVerifyConfig)

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in ALL_STAGES]
        if unknown:
            raise ValueError(
                f"stages: unknown stage {unknown[0]!r} (known: {', '.join(ALL_STAGES)})"
            )
        if self.videos_per_commit < 1:
            raise ValueError("videos_per_commit: must be >= 1")
        if self.max_attempts < 1:
            raise ValueError("max_attempts: must be >= 1")
        if self.probe_timeout_s <= 0:
            raise ValueError("probe_timeout_s: must be > 0 seconds")
        # Pipeline order, whatever order the user listed them in.
        self.stages = [s for s in ALL_STAGES if s in self.stages]


def load_curate_config(
    path: str | Path | None, overrides: list[str] | None = None, stages: str | None = None
) -> CurateConfig:
    """YAML + `--set` overrides + `--stages a,b,c`, validated."""
    extra = list(overrides or [])
    if stages is not None:
        names = [s.strip() for s in stages.split(",") if s.strip()]
        if not names:
            raise ConfigError("--stages: empty list")
        extra.append("stages=[" + ",".join(names) + "]")
    return load_config(CurateConfig, path, extra)
