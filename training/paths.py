"""Path fields of a config, made absolute on the driver in one place.

Ray workers (Ray Train ranks, Ray Data tasks, a `ray job submit` entrypoint's workers) run in
their own working directories, so a relative path in a config means something else there. Every
driver resolves each local path field of its config against its own working directory once,
before anything is handed to a worker or written into a run; URIs (`s3://...`) stay as given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stiv_core.uris import is_local


def absolute_path(value: str) -> str:
    """`value` made absolute against the working directory; "", URIs (`s3://...`) and `file://`
    URIs (already absolute) unchanged."""
    if not value or not is_local(value) or value.startswith("file://"):
        return value
    return str(Path(value).expanduser().absolute())


def resolve_path_fields(config: Any, fields: tuple[str, ...]) -> None:
    """Make each dotted path field of a dataclass config absolute, in place."""
    for dotted in fields:
        *parents, name = dotted.split(".")
        node = config
        for part in parents:
            node = getattr(node, part)
        setattr(node, name, absolute_path(getattr(node, name)))
