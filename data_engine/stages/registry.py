"""Model stages by name: how the pipeline builds each scorer from the curation config, which
columns it writes, and the start-up check that its weights exist (before any work starts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_engine.frames import ClipFrames
from data_engine.stages.base import StageError

DSG_CLAIMS_JSON = "_dsg_claims_json"  # transient column: the pipeline moves it to `dsg_claims`


def _require_clip_weights(section: str, clip_cfg: Any) -> None:
    from data_engine.stages.clip_model import require_file

    require_file(clip_cfg.checkpoint_path, f"{section}.clip.checkpoint_path")
    if clip_cfg.model_config_path:
        require_file(clip_cfg.model_config_path, f"{section}.clip.model_config_path")


def _require_chat(section: str, chat_cfg: Any) -> None:
    if chat_cfg.backend == "sidecar":
        return
    if chat_cfg.backend == "local":
        if not chat_cfg.model_path:
            raise StageError(f"{section}.model_path: required for backend 'local'")
        if not Path(chat_cfg.model_path).is_dir():
            raise StageError(f"{section}.model_path: directory not found: {chat_cfg.model_path}")
    elif not chat_cfg.base_url or not chat_cfg.model:
        raise StageError(f"{section}.base_url/{section}.model: required for backend 'openai'")


def check_ready(stage: str, cfg: Any) -> None:
    """Raise StageError naming the config key when `stage` cannot start."""
    if stage in ("aesthetic", "embedding", "category"):
        section = getattr(cfg, stage)
        _require_clip_weights(stage, section.clip)
        if stage == "aesthetic":
            from data_engine.stages.clip_model import require_file

            require_file(section.head_path, "aesthetic.head_path")
    elif stage == "caption":
        _require_chat("caption", cfg.caption)
    elif stage == "dsg":
        _require_chat("dsg_questions", cfg.dsg_questions)
        _require_chat("dsg_verify", cfg.dsg_verify)


class DSGAdapter:
    """DSG-Video as a pipeline stage: reads each clip's caption, writes per-clip metrics and
    carries the per-question claims in a transient column."""

    name = "dsg"

    def __init__(self, cfg: Any) -> None:
        from data_engine.captioning.dsg import DSGStage

        self.stage = DSGStage(cfg.dsg_questions, cfg.dsg_verify)

    def score_rows(
        self, clips: list[ClipFrames], rows: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        captions = [r.get("caption") for r in rows]
        clip_ids = [r["clip_id"] for r in rows]
        metrics, claims = self.stage.check_clips(clips, captions, clip_ids)
        by_clip: dict[str, list[dict[str, Any]]] = {}
        for claim in claims:
            by_clip.setdefault(claim["clip_id"], []).append(claim)
        out = []
        for clip_id, metric in zip(clip_ids, metrics):
            metric = dict(metric)
            metric[DSG_CLAIMS_JSON] = json.dumps(by_clip.get(clip_id, []))
            out.append(metric)
        return out


def build(stage: str, cfg: Any) -> Any:
    """The scorer object for a model stage (loads its model)."""
    check_ready(stage, cfg)
    if stage == "aesthetic":
        from data_engine.stages.aesthetic import AestheticScorer

        return AestheticScorer(cfg.aesthetic)
    if stage == "ocr":
        from data_engine.stages.ocr import OcrScorer

        return OcrScorer(cfg.ocr)
    if stage == "embedding":
        from data_engine.stages.embedding import EmbeddingScorer

        return EmbeddingScorer(cfg.embedding)
    if stage == "category":
        from data_engine.stages.category import CategoryScorer

        return CategoryScorer(cfg.category)
    if stage == "caption":
        from data_engine.captioning.caption import CaptionStage

        return CaptionStage(cfg.caption)
    if stage == "dsg":
        return DSGAdapter(cfg)
    raise StageError(f"stages: {stage!r} is not a model stage")


def output_schema(stage: str, cfg: Any) -> pa.Schema:
    """Columns a model stage writes (without loading its model)."""
    if stage == "aesthetic":
        from data_engine.stages.aesthetic import AestheticScorer

        return AestheticScorer.output_schema
    if stage == "ocr":
        from data_engine.stages.ocr import OcrScorer

        return OcrScorer.output_schema
    if stage == "embedding":
        from data_engine.stages.clip_model import clip_embed_dim
        from data_engine.stages.embedding import embedding_schema

        clip = cfg.embedding.clip
        return embedding_schema(clip_embed_dim(clip.model_name, clip.model_config_path))
    if stage == "category":
        from data_engine.stages.category import CategoryScorer

        return CategoryScorer.output_schema
    if stage == "caption":
        from data_engine.captioning.caption import CaptionStage

        return CaptionStage.output_schema
    if stage == "dsg":
        from data_engine.captioning.dsg import DSGStage

        return pa.schema([*DSGStage.output_schema, pa.field(DSG_CLAIMS_JSON, pa.string())])
    raise StageError(f"stages: {stage!r} is not a model stage")
