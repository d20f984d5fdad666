"""STIV Engine's Python API: `db = stiv.open("path or s3://...")`, then `db.query(...)`,
`db.count(...)`, `db.summary(...)`, `db.snapshot(...)`, `db.create_snapshot(...)`,
`db.text_search(...)`, `db.to_ray_dataset(...)`; errors are `stiv.QueryError` (stiv/api.py).

Imported lazily, so `stiv --help` (stiv/cli.py) does not load Lance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stiv.api import QueryError, StivDatabase, open

__all__ = ["QueryError", "StivDatabase", "open"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from stiv import api

        return getattr(api, name)
    raise AttributeError(f"module 'stiv' has no attribute {name!r}")
