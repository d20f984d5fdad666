"""OCR text area: how much of a clip's frames burned-in text covers (subtitles, title cards).

Reads a clip's sampled frames; writes `ocr_text_area` (fraction 0..1 of the frame covered by
the union of detected text boxes, the MAX over `num_frames` evenly spread frames), `ocr_text`
(the strings recognised on the frame with the most text, truncated) and `ocr_provenance`.

Why the max: the filter's purpose is to drop clips that show text at all; a title card or a
subtitle that is on screen in one sampled frame out of four is exactly what a mean would dilute.

Engine: rapidocr (PP-OCR detection + recognition ONNX models shipped in its wheel, so it runs
offline). Detection runs at the frame's own working resolution (long side ~640 px, upscaling
never adds detail) capped at `det_max_side_px`, where a 20-px subtitle line stays readable;
recognition runs only on the frame with the largest text area, since it costs ~2x detection.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, ClassVar

import cv2
import numpy as np
import pyarrow as pa

from data_engine.frames import ClipFrames, even_frame_indices
from data_engine.stages.base import ClipInput, Stage, score_frames_or_each


@dataclass
class OcrConfig:
    """Settings of the `ocr` stage."""

    num_frames: int = 4  # frames per clip run through detection, evenly spread (0 = all sampled)
    det_max_side_px: int = (
        960  # detection input long side cap (pixels); smaller frames keep their size
    )
    det_box_threshold: float = 0.5  # minimum detector confidence for a text box (0..1)
    text_score_threshold: float = 0.5  # minimum recogniser confidence to keep a string (0..1)
    text_max_chars: int = 200  # `ocr_text` is cut to this many characters
    num_threads: int = 0  # onnxruntime intra-op threads (0 = the actor's Ray CPUs, rounded up)

    def __post_init__(self) -> None:
        if self.num_frames < 0:
            raise ValueError(f"ocr.num_frames: must be >= 0, got {self.num_frames}")
        if self.det_max_side_px < 32:
            raise ValueError(f"ocr.det_max_side_px: must be >= 32, got {self.det_max_side_px}")
        for key in ("det_box_threshold", "text_score_threshold"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ocr.{key}: must be in [0, 1], got {value}")
        if self.text_max_chars < 0:
            raise ValueError(f"ocr.text_max_chars: must be >= 0, got {self.text_max_chars}")
        if self.num_threads < 0:
            raise ValueError(f"ocr.num_threads: must be >= 0, got {self.num_threads}")


def text_area_fraction(boxes: np.ndarray | None, height: int, width: int) -> float:
    """Fraction of an (height, width) frame covered by the union of quadrilateral boxes.

    boxes: (N, 4, 2) corner points in pixels, or None. Overlapping boxes count once, because
    they are rasterised into one mask rather than summed.
    """
    if boxes is None or len(boxes) == 0:
        return 0.0
    mask = np.zeros((height, width), dtype=np.uint8)
    for box in boxes:
        # One fillPoly call per box: given several polygons at once, OpenCV treats overlaps as
        # holes (even-odd rule) and two identical boxes would cancel out.
        polygon = np.round(np.asarray(box)).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(mask, [polygon], 1)
    return float(mask.mean())


def actor_threads() -> int:
    """The CPUs Ray reserved for this worker, rounded up (1 outside Ray).

    onnxruntime's default pool has a spinning thread per core and ignores Ray's reservation:
    on 2 cores, beside two decode tasks, that made `+ocr` cost 1.45-1.50x against 1.21-1.27x
    with one thread (16 files, docs/design-notes.md "Curation speed").
    """
    import ray

    if not ray.is_initialized():
        return 1
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except AssertionError:  # Ray's answer in a driver, which has no reservation
        return 1
    return max(1, math.ceil(cpus))


class OcrScorer:
    """Reads sampled frames; writes `ocr_text_area` (max over frames), `ocr_text`, provenance."""

    name: ClassVar[str] = "ocr"
    output_schema: ClassVar[pa.Schema] = pa.schema(
        [
            ("ocr_text_area", pa.float32()),
            ("ocr_text", pa.string()),
            ("ocr_provenance", pa.string()),
        ]
    )

    def __init__(self, cfg: OcrConfig) -> None:
        self.cfg = cfg
        params: dict[str, Any] = {
            "Global.log_level": "error",
            "Global.use_cls": False,  # burned-in video text is upright; skipping saves ~10%
            "Global.text_score": cfg.text_score_threshold,
            "Det.limit_type": "max",  # only ever shrink, to det_max_side_px
            "Det.limit_side_len": cfg.det_max_side_px,
            "Det.box_thresh": cfg.det_box_threshold,
        }
        if cfg.num_threads:
            params["EngineConfig.onnxruntime.intra_op_num_threads"] = cfg.num_threads
        from rapidocr import RapidOCR  # loads onnxruntime: only where the stage runs

        self.engine = RapidOCR(params=params)
        det, rec = self.engine.cfg.Det, self.engine.cfg.Rec
        self._provenance = {
            "engine": f"rapidocr {version('rapidocr')}",
            "det_model": f"{det.ocr_version} det {det.model_type}",
            "rec_model": f"{rec.ocr_version} rec {rec.model_type} ({rec.lang_type})",
            "num_frames": cfg.num_frames,
            "frame_aggregation": "max",
            "det_max_side_px": cfg.det_max_side_px,
            "det_box_threshold": cfg.det_box_threshold,
            "text_score_threshold": cfg.text_score_threshold,
            "text_source": "frame with the largest detected area; area counts recognised boxes only",
            "seeded_test_weights": False,
        }
        self._provenance_json = json.dumps(self._provenance, sort_keys=True)

    def provenance(self) -> dict[str, Any]:
        return self._provenance

    def _detect_area(self, frame_bgr: np.ndarray) -> float:
        result = self.engine(frame_bgr, use_det=True, use_cls=False, use_rec=False)
        return text_area_fraction(result.boxes, frame_bgr.shape[0], frame_bgr.shape[1])

    def _recognise(self, frame_bgr: np.ndarray) -> tuple[float, str]:
        """Area of the boxes whose text is recognised above `text_score_threshold`, and the
        text. Detection alone fires on fine textures (foliage, fabric); requiring readable text
        on the frame with the largest detected area removes those false positives for the cost
        of one recognition pass per clip."""
        result = self.engine(frame_bgr, use_det=True, use_cls=False, use_rec=True)
        if result.boxes is None or not result.txts:
            return 0.0, ""
        keep = [i for i, t in enumerate(result.txts) if t and t.strip()]
        if not keep:
            return 0.0, ""
        boxes = np.asarray(result.boxes)[keep]
        text = " ".join(result.txts[i] for i in keep)
        return text_area_fraction(boxes, frame_bgr.shape[0], frame_bgr.shape[1]), text[
            : self.cfg.text_max_chars
        ]

    def score_clip(self, clip: ClipFrames) -> dict[str, Any]:
        """Score one clip (see the module docstring for what each column means)."""
        if len(clip.frames) == 0:
            return {"error": "ocr: clip has no sampled frames"}
        picked = clip.frames[even_frame_indices(len(clip.frames), self.cfg.num_frames)]
        frames_bgr = [np.ascontiguousarray(f[..., ::-1]) for f in picked]  # rapidocr takes BGR
        areas = [self._detect_area(f) for f in frames_bgr]
        best = int(np.argmax(areas))
        area, text = self._recognise(frames_bgr[best]) if areas[best] > 0.0 else (0.0, "")
        return {
            "ocr_text_area": float(area),
            "ocr_text": text,
            "ocr_provenance": self._provenance_json,
        }

    def score_clips(self, clips: list[ClipFrames]) -> list[dict[str, Any]]:
        return [self.score_clip(c) for c in clips]


class OcrStage(Stage):
    """The `ocr` stage: burned-in text area and text (rapidocr's shipped models)."""

    name: ClassVar[str] = "ocr"
    runs_on: ClassVar[str] = "actor"
    sections: ClassVar[dict[str, type]] = {"ocr": OcrConfig}

    @classmethod
    def output_schema(cls, cfg: Any) -> pa.Schema:
        return OcrScorer.output_schema

    def setup(self) -> None:
        cfg = self.cfg.ocr
        if not cfg.num_threads:
            cfg = dataclasses.replace(cfg, num_threads=actor_threads())
        self.scorer = OcrScorer(cfg)

    def __call__(self, batch: list[ClipInput]) -> list[dict[str, Any]]:
        return score_frames_or_each(batch, self.scorer.score_clips)
