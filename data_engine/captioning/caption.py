"""Caption stage: a video-language model describes each clip from its sampled frames.

Frames are sent as images in one chat request per clip (STIV, data engine: a video LLM's
captions hallucinate less than frame captions summarised by an LLM). The stage stores who made
the caption (backend, model, prompt hash) and how long it took, so captions from two models or
two prompts never get mixed up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

from data_engine.captioning.backends import (
    BackendConfig,
    ChatBackend,
    ChatRequest,
    config_summary,
    make_backend,
    require_chat,
    text_hash,
)
from data_engine.frames import ClipFrames, even_frame_indices
from data_engine.stages.base import ClipInput, Stage, score_frames_or_each

DEFAULT_CAPTION_PROMPT = (
    "These are frames sampled in order from one video clip. Describe the video in detail: the "
    "main subjects and their appearance, what they do, how the camera moves, and the setting. "
    "Describe only what is visible. Answer in one paragraph."
)


@dataclass
class CaptionConfig(BackendConfig):
    """The `caption` config section."""

    section: ClassVar[str] = "caption"
    # "sidecar": captions shipped with the dataset as `<video stem>.txt` next to each video
    # (one caption for every clip of that video); read by the pipeline, no model runs.
    extra_backends: ClassVar[tuple[str, ...]] = ("sidecar",)

    prompt: str = DEFAULT_CAPTION_PROMPT  # instruction sent after the frames
    frames_per_clip: int = 8  # frames sent per clip, evenly spaced over the sampled ones
    max_tokens: int = 256  # cap on caption length in tokens

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prompt.strip():
            raise ValueError("caption.prompt: must not be empty")
        if self.frames_per_clip < 1:
            raise ValueError(f"caption.frames_per_clip: must be >= 1, got {self.frames_per_clip}")
        if self.max_tokens < 1:
            raise ValueError(f"caption.max_tokens: must be >= 1, got {self.max_tokens}")


class Captioner:
    """Reads a clip's sampled frames; writes caption, caption_backend, caption_model,
    caption_prompt_hash, caption_time_s and caption_provenance."""

    name: ClassVar[str] = "caption"
    output_schema: ClassVar[pa.Schema] = pa.schema(
        [
            ("caption", pa.string()),
            ("caption_backend", pa.string()),  # "openai" | "local"
            ("caption_model", pa.string()),  # served model name, or local directory name
            ("caption_prompt_hash", pa.string()),  # sha256[:16] of the prompt text
            ("caption_time_s", pa.float64()),  # wall seconds for this clip's request
            ("caption_provenance", pa.string()),  # JSON: backend identity + sampling settings
        ]
    )

    def __init__(self, config: CaptionConfig, backend: ChatBackend | None = None) -> None:
        """Loads the model or opens the client once (in the Ray actor's constructor).

        `backend` lets a caller share one already-loaded backend between stages.
        """
        self.config = config
        self.backend = backend if backend is not None else make_backend(config)
        self.prompt_hash = text_hash(config.prompt)
        self._identity = self.backend.identity()

    def provenance(self) -> dict[str, Any]:
        return {
            **self._identity,
            **config_summary(self.config),
            "prompt_hash": self.prompt_hash,
            "frames_per_clip": self.config.frames_per_clip,
            "max_tokens": self.config.max_tokens,
        }

    def request_for(self, clip: ClipFrames) -> ChatRequest:
        """The chat request that captions one clip."""
        idx = even_frame_indices(len(clip.frames), self.config.frames_per_clip).tolist()
        return ChatRequest(
            prompt=self.config.prompt,
            images=tuple(clip.frames[i] for i in idx),
            max_tokens=self.config.max_tokens,
            temperature=self.config.temperature,
        )

    def score_clips(self, clips: list[ClipFrames]) -> list[dict[str, Any]]:
        """One row per clip; a clip whose request failed gets {"error": ...} instead."""
        rows: list[dict[str, Any]] = [{} for _ in clips]
        todo = []
        for i, clip in enumerate(clips):
            if len(clip.frames) == 0:
                rows[i] = {"error": "caption: clip has no sampled frames"}
            else:
                todo.append(i)
        replies = self.backend.complete([self.request_for(clips[i]) for i in todo])
        provenance = json.dumps(self.provenance(), sort_keys=True)
        for i, reply in zip(todo, replies):
            caption = (reply.text or "").strip()
            if not reply.ok:
                rows[i] = {"error": f"caption: {reply.error}"}
            elif not caption:  # an empty caption is a failure, not a caption
                rows[i] = {"error": "caption: model returned an empty caption"}
            else:
                rows[i] = {
                    "caption": caption,
                    "caption_backend": self._identity["backend"],
                    "caption_model": self._identity["model"],
                    "caption_prompt_hash": self.prompt_hash,
                    "caption_time_s": reply.time_s,
                    "caption_provenance": provenance,
                }
        return rows

    def close(self) -> None:
        self.backend.close()


def sidecar_caption(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Caption columns from `<video stem>.txt` beside the video (datasets that ship captions).
    A missing or empty file leaves the caption null, which `prepare` skips."""
    from data_engine.video import VideoError, open_input

    stem, _, _ = uri.rpartition(".")
    text = None
    try:
        source = open_input(stem + ".txt", storage_options)
        if isinstance(source, str):
            with open(source, encoding="utf-8") as handle:
                text = handle.read().strip() or None
        else:
            with source:
                text = source.read().decode("utf-8").strip() or None
    except (OSError, VideoError):
        text = None
    return {
        "caption": text,
        "caption_backend": "sidecar",
        "caption_model": "",
        "caption_prompt_hash": "",
        "caption_time_s": 0.0,
        "caption_provenance": json.dumps({"backend": "sidecar", "file": stem + ".txt"}),
    }


class CaptionStage(Stage):
    """The `caption` stage: a video-language model's caption of each clip's sampled frames, or
    the dataset's own `<video stem>.txt` (backend "sidecar")."""

    name: ClassVar[str] = "caption"
    runs_on: ClassVar[str] = "actor"
    sections: ClassVar[dict[str, type]] = {"caption": CaptionConfig}

    @classmethod
    def output_schema(cls, cfg: Any) -> pa.Schema:
        return Captioner.output_schema

    @classmethod
    def check_ready(cls, cfg: Any) -> None:
        require_chat("caption", cfg.caption)

    def setup(self) -> None:
        self.sidecar = self.cfg.caption.backend == "sidecar"
        self.captioner = None if self.sidecar else Captioner(self.cfg.caption)

    def __call__(self, batch: list[ClipInput]) -> list[dict[str, Any]]:
        if self.sidecar:
            options = self.cfg.storage_options or None
            return [sidecar_caption(item.row["uri"], options) for item in batch]
        return score_frames_or_each(batch, self.captioner.score_clips)

    def teardown(self) -> None:
        if self.captioner is not None:
            self.captioner.close()
