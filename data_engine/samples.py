"""Moved: the synthetic test videos now live in `demos.samples`, the MP4 writer in
`data_engine.video`. This module stays only while `training/` imports `write_video` from it."""

from data_engine.video import write_video

__all__ = ["write_video"]
