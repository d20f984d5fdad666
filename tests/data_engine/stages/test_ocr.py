"""OCR text area with the real rapidocr engine on rendered text."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from stage_helpers import make_clip

from data_engine.stages.ocr import OcrConfig, OcrScorer, text_area_fraction


@pytest.fixture(scope="module")
def scorer() -> OcrScorer:
    return OcrScorer(OcrConfig(num_frames=4))


def plain_frame(value: int = 60) -> np.ndarray:
    """A textless 640x360 frame with a soft gradient (so it is not trivially flat)."""
    ramp = np.linspace(value, value + 60, 640, dtype=np.float32)
    return np.repeat(np.repeat(ramp[None, :, None], 360, axis=0), 3, axis=2).astype(np.uint8)


def title_card() -> np.ndarray:
    frame = plain_frame()
    cv2.putText(frame, "HELLO WORLD", (60, 150), cv2.FONT_HERSHEY_SIMPLEX, 2.0, (255, 255, 255), 4)
    return frame


def subtitle_frame() -> np.ndarray:
    """A subtitle-like band: small white text on a dark strip near the bottom."""
    frame = plain_frame()
    cv2.rectangle(frame, (0, 305), (640, 345), (0, 0, 0), -1)
    cv2.putText(
        frame, "where are you going", (150, 333), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2
    )
    return frame


def test_text_scores_clearly_above_no_text(scorer):
    """A title card and a subtitle band must both stand out from a textless clip, and the
    recognised text must contain the rendered words (real OCR, not a heuristic)."""
    rows = scorer.score_clips(
        [
            make_clip(np.stack([plain_frame()] * 2)),
            make_clip(np.stack([title_card()] * 2)),
            make_clip(np.stack([subtitle_frame()] * 2)),
        ]
    )
    blank, title, subtitle = rows
    assert blank["ocr_text_area"] == 0.0 and blank["ocr_text"] == ""
    assert title["ocr_text_area"] > 0.05  # ~400x55 px box on 640x360
    assert subtitle["ocr_text_area"] > 0.01  # a ~260x28 px subtitle line
    assert "HELLO" in title["ocr_text"].upper()
    assert "going" in subtitle["ocr_text"].lower()
    prov = json.loads(title["ocr_provenance"])
    assert prov["frame_aggregation"] == "max" and prov["engine"].startswith("rapidocr")


def test_text_on_one_frame_counts_fully(scorer):
    """Max over frames: a title card on one sampled frame out of four is not diluted."""
    frames = np.stack([plain_frame()] * 3 + [title_card()])
    only_one = scorer.score_clips([make_clip(frames)])[0]
    every = scorer.score_clips([make_clip(title_card()[None])])[0]
    assert only_one["ocr_text_area"] == pytest.approx(every["ocr_text_area"], rel=1e-6)


def test_text_is_truncated():
    """ocr_text stays short enough for a table column."""
    scorer = OcrScorer(OcrConfig(num_frames=1, text_max_chars=5))
    row = scorer.score_clips([make_clip(title_card()[None])])[0]
    assert len(row["ocr_text"]) == 5


def test_area_is_the_union_of_boxes():
    """Overlapping boxes count once; the fraction is relative to the frame area."""
    box = np.array([[0, 0], [49, 0], [49, 49], [0, 49]], np.float32)  # 50x50 px
    assert text_area_fraction(None, 100, 100) == 0.0
    assert text_area_fraction(box[None], 100, 100) == pytest.approx(0.25)
    assert text_area_fraction(np.stack([box, box]), 100, 100) == pytest.approx(0.25)
    shifted = box + np.array([50, 50], np.float32)
    assert text_area_fraction(np.stack([box, shifted]), 100, 100) == pytest.approx(0.5)


def test_config_validation():
    with pytest.raises(ValueError, match=r"ocr\.det_box_threshold"):
        OcrConfig(det_box_threshold=1.5)
    with pytest.raises(ValueError, match=r"ocr\.num_frames"):
        OcrConfig(num_frames=-2)


def test_auto_threads_follow_the_actors_ray_cpus(ray_session):
    """`ocr.num_threads: 0` gives onnxruntime the CPUs Ray reserved for the actor, rounded up,
    instead of its default pool of one spinning thread per core."""
    from data_engine.stages.ocr import actor_threads

    @ray_session.remote
    def threads() -> int:
        return actor_threads()

    assert actor_threads() == 1  # the driver reserves nothing
    assert ray_session.get(threads.options(num_cpus=0.5).remote()) == 1
    assert ray_session.get(threads.options(num_cpus=2).remote()) == 2
