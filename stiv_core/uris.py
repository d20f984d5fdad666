"""Local paths versus object-store URIs: the one test of the project."""

from __future__ import annotations

import os
from urllib.parse import urlparse


def is_local(uri: str) -> bool:
    """True for a local path (`videos/a.mp4`, `/data/db`, `C:\\videos\\a.mp4`) or a `file://`
    URI; False for any other `scheme://` URI (`s3://bucket/db`, `gs://...`, `http://...`),
    which is passed to the object-store reader unchanged."""
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    """The absolute filesystem path of a local `uri` (see `is_local`): `file://` removed, `~`
    expanded, made absolute against the working directory."""
    if uri.startswith("file://"):
        uri = urlparse(uri).path
    return os.path.abspath(os.path.expanduser(uri))
