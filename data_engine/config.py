"""The curation config: one typed dataclass tree, serialised as `pipelines/curate*.yaml`.

Its sections come from the stage list (`data_engine.stage_list.STAGES`): every stage's
`sections` become top-level sections (`split`, `ocr`, `aesthetic`, ... `dsg_questions`), and
every actor stage gets `resources.<stage>` (its pool size, CPUs, GPUs, batch size).
`load_curate_config(path, overrides)` validates everything (stage names included) before any
work starts; each error names its field. Loading it imports no model library.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from data_engine.stage_list import STAGES
from data_engine.stages.base import Stage, StageResources
from data_engine.video import DEFAULT_PROBE_TIMEOUT_S, SamplingConfig
from stiv_core.config import ConfigError, load_config

DEFAULT_STAGES = ("probe", "split", "motion", "clarity")


@dataclass
class ResourceDefaults:
    """Ray resources shared by every stage unless `resources.<stage>` says otherwise.
    0 means: derive from the cluster (`ray.cluster_resources()`)."""

    cpus_per_task: float = 0.0  # CPUs reserved per video decode task; 0 = auto (see plan_resources)
    model_actors: int = 0  # actors per model stage (min == max, so pools start full); 0 = auto
    cpus_per_model_actor: float = 0.0  # CPUs reserved by each model actor; 0 = auto (all fit)
    gpus_per_model_actor: float = 0.0  # GPUs per model actor (0 on CPU machines)
    model_batch_size: int = 8  # clips per model batch
    memory_per_task_mb: int = 0  # memory hint per decode task (MiB); 0 = no hint

    def __post_init__(self) -> None:
        if self.cpus_per_task < 0:
            raise ValueError("resources.cpus_per_task: must be >= 0 (0 = auto)")
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

    def for_stage(self, name: str) -> StageResources:
        """`resources.<name>` (defaults for a stage without its own entry)."""
        return getattr(self, name, None) or StageResources()


@dataclass
class CurateBase:
    """Everything `stiv curate` does that is not one stage's own section."""

    stage_classes: ClassVar[tuple[type[Stage], ...]] = STAGES

    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    # Stages to run, in pipeline order (`--stages` overrides). probe and split always run for
    # new videos; without INPUTs the listed scoring stages are backfilled on existing clips.
    videos_per_commit: int = 16  # finished videos committed together (fewer, larger commits)
    commit_interval_s: float = 30.0  # ... or whatever is finished after this many seconds
    max_attempts: int = 3  # tries per video (and per clip and stage) before it stays quarantined
    probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S  # budget to open a video, decode frame 0 (s)
    storage_options: dict[str, str] = field(default_factory=dict)
    # Lance/object-store options (endpoint, region, ...); credentials come from the environment.
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        known = [s.name for s in self.stage_classes]
        unknown = [s for s in self.stages if s not in known]
        if unknown:
            raise ValueError(f"stages: unknown stage {unknown[0]!r} (known: {', '.join(known)})")
        if self.videos_per_commit < 1:
            raise ValueError("videos_per_commit: must be >= 1")
        if self.commit_interval_s <= 0:
            raise ValueError("commit_interval_s: must be > 0 seconds")
        if self.max_attempts < 1:
            raise ValueError("max_attempts: must be >= 1")
        if self.probe_timeout_s <= 0:
            raise ValueError("probe_timeout_s: must be > 0 seconds")
        # Pipeline order, whatever order the user listed them in.
        self.stages = [name for name in known if name in self.stages]

    def selected(self) -> list[type[Stage]]:
        """The classes of the stages this run lists, in pipeline order."""
        return [s for s in self.stage_classes if s.name in self.stages]


@cache
def curate_config_class(stages: tuple[type[Stage], ...] = STAGES) -> type:
    """The config dataclass for a stage list: CurateBase plus one field per stage section and
    `resources.<stage>` for every actor stage."""
    resource_fields = [
        (s.name, StageResources, field(default_factory=StageResources))
        for s in stages
        if s.runs_on == "actor"
    ]
    resources = dataclasses.make_dataclass(
        "ResourcesConfig", resource_fields, bases=(ResourceDefaults,)
    )
    section_fields: list[tuple[str, type, Any]] = [
        ("resources", resources, field(default_factory=resources))
    ]
    for stage in stages:
        for section, section_cls in stage.sections.items():
            section_fields.append((section, section_cls, field(default_factory=section_cls)))
    cls = dataclasses.make_dataclass(
        "CurateConfig",
        section_fields,
        bases=(CurateBase,),
        namespace={"stage_classes": stages, "__doc__": CurateBase.__doc__},
    )
    # Importable by name, so Ray pickles configs by reference.
    for made in (cls, resources):
        made.__module__ = __name__
    return cls


CurateConfig = curate_config_class(STAGES)
ResourcesConfig = CurateConfig.__dataclass_fields__["resources"].type
ALL_STAGES = tuple(s.name for s in STAGES)


def load_curate_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    stages: str | None = None,
    stage_classes: tuple[type[Stage], ...] = STAGES,
) -> Any:
    """YAML + `--set` overrides + `--stages a,b,c`, validated."""
    extra = list(overrides or [])
    if stages is not None:
        names = [s.strip() for s in stages.split(",") if s.strip()]
        if not names:
            raise ConfigError("--stages: empty list")
        extra.append("stages=[" + ",".join(names) + "]")
    return load_config(curate_config_class(tuple(stage_classes)), path, extra)
