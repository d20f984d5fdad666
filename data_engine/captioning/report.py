"""DSG-Video metrics over any set of clips (STIV, data engine).

DSG-Video_i: hallucinated objects / mentioned objects, pooled over all captions, in percent.
DSG-Video_s: captions with at least one hallucinated object / captions, in percent.
The paper reports both on 100 captions (video captions 5.3 and 15.0; lower is better).
Only clips whose DSG check finished (`dsg_status == "ok"`) count; failed and unchecked clips
are left out, not counted as clean.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

REQUIRED_COLUMNS = ("dsg_status", "dsg_num_objects", "dsg_num_hallucinated")


def dsg_report(clips: pa.Table) -> dict[str, Any]:
    """{"dsg_video_i", "dsg_video_s", "captions", "objects"} plus the counts behind them.

    The two metrics are percentages (None when no clip has DSG results). Attribute and
    relation questions are reported separately (`attr_rel_*`) and never enter the metrics.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in clips.column_names]
    if missing:
        raise ValueError(f"dsg_report: clips table lacks columns {missing} (run the dsg stage)")
    checked = clips.filter(pc.equal(clips["dsg_status"], "ok"))
    objects = _sum(checked, "dsg_num_objects")
    hallucinated = _sum(checked, "dsg_num_hallucinated")
    captions = checked.num_rows
    with_hallucination = (
        int(pc.sum(pc.greater(checked["dsg_num_hallucinated"], 0)).as_py() or 0) if captions else 0
    )
    report: dict[str, Any] = {
        "dsg_video_i": 100.0 * hallucinated / objects if objects else None,
        "dsg_video_s": 100.0 * with_hallucination / captions if captions else None,
        "captions": captions,
        "objects": objects,
        "hallucinated_objects": hallucinated,
        "captions_with_hallucination": with_hallucination,
        "failed": int(pc.sum(pc.equal(clips["dsg_status"], "failed")).as_py() or 0),
    }
    if "dsg_num_attr_rel" in clips.column_names:
        asked = _sum(checked, "dsg_num_attr_rel") - _sum(checked, "dsg_num_attr_rel_skipped")
        false = _sum(checked, "dsg_num_attr_rel_false")
        report.update(
            attr_rel_questions=_sum(checked, "dsg_num_attr_rel"),
            attr_rel_skipped=_sum(checked, "dsg_num_attr_rel_skipped"),
            attr_rel_false=false,
            attr_rel_false_pct=100.0 * false / asked if asked else None,
        )
    return report


def _sum(table: pa.Table, column: str) -> int:
    return int(pc.sum(table[column]).as_py() or 0) if table.num_rows else 0
